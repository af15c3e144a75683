"""What one decode pass over an n-token block costs against a 1-token pass, with a KV cache of a given length.

    python benchmarks/pass_cost.py                                   # SmolLM2-135M, this machine, float32 + bfloat16
    python benchmarks/pass_cost.py --shape llama7b --device cuda --dtypes bfloat16   # 7B-like shape, random weights

Jacobi decoding makes one pass per step over n tokens; greedy AR makes one pass per token over 1 token. So with
`accepted` tokens per Jacobi step, the speedup over AR is about accepted / (cost(n) / cost(1)), and cost(n) / cost(1)
is the acceptance Jacobi needs just to break even. Memory-bound hardware (a GPU at batch 1, a CPU with AMX) has
cost(n) ~ cost(1) for small n, so the speedup tracks the acceptance; a compute-bound CPU does not. Prints a table
and writes JSON (--output).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError
from cllm.files import write_json
from cllm.models import load_model, resolve_dtype
from cllm.timing import pass_seconds

# Random-weight shapes (the cost of a pass depends on the shape, not on the weights).
SHAPES = {
    "llama7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
}


def build(shape: str, dtype: torch.dtype, device: str, layers: int | None) -> torch.nn.Module:
    """The real SmolLM2 (`smollm2-135m`) or a random-weight model of a named shape, built directly on `device`."""
    if shape not in SHAPES:
        model, _ = load_model(shape, dtype=dtype, device=device)
        return model
    options = dict(SHAPES[shape])
    if layers is not None:
        options["num_hidden_layers"] = layers
    config = LlamaConfig(**options, max_position_embeddings=4096, attn_implementation="sdpa")
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@dataclass(kw_only=True)
class PassCostSettings:
    """`benchmarks/pass_cost.py`: the cost of one decode pass over a block against a 1-token pass.

    Args:
        shape: a model spec (cllm.models), or a random-weight shape: llama7b.
        layers: override the layer count of a random shape.
        device: cpu | cuda | cuda:1 ...
        dtypes: the dtypes measured, each in turn.
        context: KV cache length before the block.
        blocks: block sizes measured (with 1: every ratio is to the 1-token pass).
        repeats: timed passes per block (their median; after one warm-up pass).
        output: the JSON to write.
    """

    shape: str = "smollm2-135m"
    layers: int | None = None
    device: str = "cpu"
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    context: int = 256
    blocks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    repeats: int = 10
    output: str = "docs/results/pass_cost.json"


def main(argv: list[str]) -> None:
    args = parse_settings(PassCostSettings, argv, "benchmarks/pass_cost.py", __doc__)
    if 1 not in args.blocks or min(args.blocks) < 1:
        raise UserError(f"--blocks must be >= 1 and hold 1 (the pass every ratio is to), got {args.blocks}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {args.repeats}")

    rows = []
    for dtype_name in args.dtypes:
        model = build(args.shape, resolve_dtype(dtype_name), args.device, args.layers)
        one = pass_seconds(model, args.context, 1, args.repeats)
        for block in args.blocks:
            seconds = one if block == 1 else pass_seconds(model, args.context, block, args.repeats)
            rows.append({"dtype": dtype_name, "block": block, "ms": seconds * 1e3, "x_one_token": seconds / one})
        del model
    fastest_one = min(r["ms"] for r in rows if r["block"] == 1)
    print(f"shape={args.shape} layers={args.layers or 'all'} device={args.device} context={args.context}")
    print(f"{'dtype':>9} {'block':>5} {'ms/pass':>8} {'x 1-token':>9} {'x fastest 1-token':>17}")
    for row in rows:
        row["x_fastest_one_token"] = row["ms"] / fastest_one
        print(
            f"{row['dtype']:>9} {row['block']:>5} {row['ms']:8.2f} {row['x_one_token']:9.2f} "
            f"{row['x_fastest_one_token']:17.2f}"
        )
    print("break-even acceptance for Jacobi at block n = its 'x fastest 1-token' (AR runs in its fastest dtype)")
    settings = {k: getattr(args, k) for k in ("shape", "layers", "device", "context", "repeats")}
    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    write_json(args.output, {"settings": settings, "machine": machine, "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

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

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from cllm.files import write_json
from cllm.jacobi import cache_argument
from cllm.models import load_model, resolve_dtype

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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def pass_seconds(model, context: int, block: int, repeats: int, device: str) -> float:
    """Median seconds of one forward over `block` new tokens after a `context`-token KV cache (the cache is cropped
    back after every pass, so each pass sees the same cache length, as a Jacobi step does)."""
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    tokens = torch.randint(0, vocab, (1, block), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    positions = torch.arange(context, context + block, device=device)[None]
    times = []
    for _ in range(repeats + 1):  # the first pass is a warm-up
        synchronize(device)
        start = time.perf_counter()
        model(input_ids=tokens, position_ids=positions, use_cache=True, **cache_argument(model, cache))
        synchronize(device)
        times.append(time.perf_counter() - start)
        cache.crop(-block)  # drop the block's slots again
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="smollm2-135m", help=f"a model spec, or a random shape: {list(SHAPES)}")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count of a random shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--context", type=int, default=256, help="KV cache length before the block")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", type=Path, default=Path("docs/results/pass_cost.json"))
    args = parser.parse_args()

    rows = []
    for dtype_name in args.dtypes:
        model = build(args.shape, resolve_dtype(dtype_name), args.device, args.layers)
        one = pass_seconds(model, args.context, 1, args.repeats, args.device)
        for block in args.blocks:
            seconds = one if block == 1 else pass_seconds(model, args.context, block, args.repeats, args.device)
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
    main()

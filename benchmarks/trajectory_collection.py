"""Trajectory collection speed: batched vs batch-1 in the same run (prompts/s, generated tokens/s).

    python benchmarks/trajectory_collection.py --model smollm2-135m --limit 16 --max_new_tokens 64 \
        --batch_sizes 1 8 --dtypes float32 --output benchmarks/trajectory_collection.json

Every configuration collects the same prompts with `cllm.trajectory.collect_trajectories` (what
`cllm trajectories` runs); "same fixed points" counts prompts whose generated tokens equal the first
configuration's (batching changes float rounding, so a near-tie may flip in float32/bfloat16).
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cllm.arguments import parse_settings, run_script
from cllm.collection import row_seed
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.errors import UserError
from cllm.models import eos_ids, load_model
from cllm.runners import cut_at_eos
from cllm.trajectory import collect_trajectories


def run(model, tokenizer, prompt_ids, batch_size: int, n: int, max_new_tokens: int) -> dict:
    start = time.perf_counter()
    outputs, blocks = [], 0
    iterations = 0
    eos = eos_ids(model, tokenizer)
    for first in range(0, len(prompt_ids), batch_size):
        batch = prompt_ids[first : first + batch_size]
        result = collect_trajectories(
            model,
            batch,
            n=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            seeds=[row_seed(0, first + i) for i in range(len(batch))],
        )
        for prompt_blocks in result:
            tokens = [t for _, states in prompt_blocks for t in states[-1]][:max_new_tokens]
            tokens = cut_at_eos(tokens, eos)
            outputs.append(tokens)
            blocks += len(prompt_blocks)
            iterations += sum(len(states) for _, states in prompt_blocks)
    seconds = time.perf_counter() - start
    generated = sum(len(t) for t in outputs)
    return {
        "batch_size": batch_size,
        "seconds": round(seconds, 2),
        "prompts_per_s": round(len(prompt_ids) / seconds, 3),
        "generated_tokens_per_s": round(generated / seconds, 1),
        "generated_tokens": generated,
        "blocks": blocks,
        "states_per_block": round(iterations / max(blocks, 1), 2),
        "outputs": outputs,
    }


@dataclass(kw_only=True)
class CollectionSpeedSettings:
    """`benchmarks/trajectory_collection.py`: batched against batch-1 trajectory collection speed.

    Args:
        model: model spec (cllm.models).
        prompts: prompt source (as `cllm trajectories --prompts`).
        limit: the first K prompts.
        n: block size.
        max_new_tokens: generated tokens per prompt.
        batch_sizes: batch sizes timed (each speedup is to the first).
        dtypes: the dtypes timed, each in turn.
        device: cpu | cuda | cuda:1 ... (default: cuda where there is one).
        output: the JSON to write.
        threads: torch CPU threads (1 on a busy shared machine; default: torch's).
    """

    model: str = "smollm2-135m"
    prompts: str = "stdlib-code:train"
    limit: int = 16
    n: int = 16
    max_new_tokens: int = 64
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    dtypes: list[str] = field(default_factory=lambda: ["float32"])
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    output: str = str(Path(__file__).with_suffix(".json"))
    threads: int | None = None


def main(argv: list[str]) -> None:
    args = parse_settings(CollectionSpeedSettings, argv, "benchmarks/trajectory_collection.py", __doc__)
    for key in ("limit", "n", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UserError(f"--batch_sizes must be >= 1, got {args.batch_sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for dtype in args.dtypes:
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device)
        prompts = load_prompts(args.prompts, limit=args.limit)
        prompt_ids = encode_prompts(tokenizer, prompts)
        run(model, tokenizer, prompt_ids[:1], 1, args.n, args.n)  # warm-up (allocator, kernels)
        reference = None
        for batch_size in args.batch_sizes:
            row = run(model, tokenizer, prompt_ids, batch_size, args.n, args.max_new_tokens)
            outputs = row.pop("outputs")
            reference = reference or outputs
            row["same_fixed_points"] = f"{sum(a == b for a, b in zip(outputs, reference))}/{len(outputs)}"
            rows.append({"dtype": dtype, **row})
            print(json.dumps(rows[-1]), flush=True)
    for dtype in args.dtypes:
        base = next(r for r in rows if r["dtype"] == dtype and r["batch_size"] == args.batch_sizes[0])
        for row in rows:
            if row["dtype"] == dtype:
                row["speedup_vs_first"] = round(row["prompts_per_s"] / base["prompts_per_s"], 2)

    header = [
        "dtype",
        "batch_size",
        "seconds",
        "prompts_per_s",
        "generated_tokens_per_s",
        "states_per_block",
        "same_fixed_points",
        "speedup_vs_first",
    ]
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    result = {
        "benchmark": "trajectory_collection",
        "model": args.model,
        "prompts": args.prompts,
        "prompt_count": args.limit,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "device": args.device if args.device != "cuda" else torch.cuda.get_device_name(),
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "rows": rows,
    }
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

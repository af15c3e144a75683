"""Batched vs batch-1 Jacobi decoding throughput on the same prompts, same process.

    python benchmarks/jacobi_batching.py --model smollm2-135m --prompts humaneval --limit 16 \
        --batch-sizes 1 8 --dtypes float32 bfloat16 --output docs/results/jacobi_batching.json

Prints a table (tokens/s per dtype and batch size, and the ratio to batch 1 of the same dtype) and writes JSON.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, replace

import torch

from cllm.arguments import parse_settings, run_script
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.errors import UserError
from cllm.files import write_json
from cllm.jacobi import DecodeOptions, jacobi_generate
from cllm.models import eos_ids, load_model


@dataclass(kw_only=True)
class BatchingSettings:
    """`benchmarks/jacobi_batching.py`: batched against batch-1 Jacobi decoding throughput.

    Args:
        model: model spec (cllm.models).
        prompts: prompt set: humaneval, json-extract:test, stdlib-code:test, or a .jsonl file.
        limit: the first K prompts.
        n: block size.
        max_new_tokens: generation budget per prompt.
        batch_sizes: batch sizes timed (each ratio is to the first).
        dtypes: the dtypes timed, each in turn.
        output: the JSON to write.
    """

    model: str = "smollm2-135m"
    prompts: str = "humaneval"
    limit: int = 16
    n: int = 16
    max_new_tokens: int = 64
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    dtypes: list[str] = field(default_factory=lambda: ["float32", "bfloat16"])
    output: str = "docs/results/jacobi_batching.json"


def main(argv: list[str]) -> None:
    args = parse_settings(BatchingSettings, argv, "benchmarks/jacobi_batching.py", __doc__)
    for key in ("limit", "n", "max_new_tokens"):
        if getattr(args, key) < 1:
            raise UserError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise UserError(f"--batch_sizes must be >= 1, got {args.batch_sizes}")

    prompts = load_prompts(args.prompts, limit=args.limit)
    rows = []
    for dtype in args.dtypes:
        model, tokenizer = load_model(args.model, dtype=dtype)
        prompt_ids = encode_prompts(tokenizer, prompts)
        options = DecodeOptions(
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            eos_token_id=eos_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        jacobi_generate(model, prompt_ids[:2], replace(options, max_new_tokens=4))  # warm-up
        for batch_size in args.batch_sizes:
            start = time.perf_counter()
            result = decode_batched(model, prompt_ids, batch_size=batch_size, options=options)
            seconds = time.perf_counter() - start
            tokens = sum(map(len, result.tokens))
            rows.append(
                {
                    "dtype": dtype,
                    "batch_size": batch_size,
                    "tokens": tokens,
                    "seconds": seconds,
                    "tokens_per_s": tokens / seconds,
                    "steps": sum(result.forward_passes),
                    "accepted_tokens_per_step": result.mean_accepted_tokens_per_step,
                }
            )
    for row in rows:
        base = next(r for r in rows if r["dtype"] == row["dtype"] and r["batch_size"] == args.batch_sizes[0])
        row["ratio_to_first_batch_size"] = row["tokens_per_s"] / base["tokens_per_s"]

    print(
        f"model={args.model} prompts={args.prompts}[:{args.limit}] n={args.n} max_new_tokens={args.max_new_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'dtype':>9} {'batch':>5} {'tokens':>6} {'seconds':>8} {'tokens/s':>9} {'tok/step':>8} {'x batch1':>8}")
    for r in rows:
        print(
            f"{r['dtype']:>9} {r['batch_size']:>5} {r['tokens']:>6} {r['seconds']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['accepted_tokens_per_step']:>8.3f} {r['ratio_to_first_batch_size']:>8.2f}"
        )
    write_json(args.output, {"config": dataclasses.asdict(args), "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

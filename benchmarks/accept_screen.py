"""Untimed acceptance screen: plain-Jacobi tokens/step and quality of model folders on a validation split.

For choosing between training variants (#30) before any of them gets the timed evaluation: many prompts, batched,
nothing timed, the validation split (never the test split the reported figures use). Not a reported figure.

    OMP_NUM_THREADS=1 python benchmarks/accept_screen.py --models smollm2-135m runs/json-demo/model \
        --prompts json-extract:validation --limit 96 --output runs/screen/demo.json

Prints one line per model: mean tokens/step with a 95% bootstrap interval over prompts, the prompt set's quality
(json-extract: valid / exact / fields), the degenerate rate and the share of outputs equal to the first model's.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.files import write_json
from cllm.hardware import recorded_cpu_flags
from cllm.models import eos_ids, load_model
from cllm.scoring import has_repeated_run, quality


def bootstrap_mean(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(draws))
    return means[int(0.025 * draws)], means[int(0.975 * draws) - 1]


def screen(spec: str, prompts, *, n: int, max_new_tokens: int, batch_size: int, dtype: str, init: str) -> dict:
    model, tokenizer = load_model(spec, dtype=dtype)
    ids = encode_prompts(tokenizer, prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        result = decode_batched(
            model,
            ids,
            batch_size=batch_size,
            n=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids(model, tokenizer),
            init=init,
        )
    texts = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens]
    rates = [len(t) / max(1, len(a)) for t, a in zip(result.tokens, result.accepted_per_pass)]
    return {
        "model": spec,
        "tokens_per_step": statistics.fmean(rates),
        "ci95": bootstrap_mean(rates),
        "per_prompt": rates,
        "quality": quality(prompts[0].id.split("/")[0], prompts, texts),
        "degenerate_rate": sum(has_repeated_run(t) for t in result.tokens) / len(result.tokens),
        "tokens": result.tokens,
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--prompts", default="json-extract:validation")
    parser.add_argument("--limit", type=int, default=96)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--init", default="context", help="initial guess of fresh positions (INIT_STRATEGIES)")
    parser.add_argument("--output")
    args = parser.parse_args()
    prompts = load_prompts(args.prompts, limit=args.limit)
    rows = []
    for spec in args.models:
        row = screen(
            spec,
            prompts,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            dtype=args.dtype,
            init=args.init,
        )
        row["equal_to_first"] = (
            sum(a == b for a, b in zip(row["tokens"], rows[0]["tokens"])) / len(prompts) if rows else 1.0
        )
        rows.append(row)
        lo, hi = row["ci95"]
        scores = ", ".join(f"{k} {v:.2f}" for k, v in row["quality"].items())
        print(
            f"{spec}: {row['tokens_per_step']:.3f} tokens/step [{lo:.3f}, {hi:.3f}]; {scores}; "
            f"degenerate {row['degenerate_rate']:.2f}; = first model {row['equal_to_first']:.2f} "
            f"({row['seconds']:.0f} s)",
            flush=True,
        )
    if args.output:
        for row in rows:
            row.pop("tokens")
        write_json(
            Path(args.output),
            {
                "command": "python benchmarks/accept_screen.py "
                + " ".join(
                    f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items() if v
                ),
                "prompts": args.prompts,
                "limit": len(prompts),
                "n": args.n,
                "init": args.init,
                "max_new_tokens": args.max_new_tokens,
                "machine": {
                    "cpu_flags": recorded_cpu_flags(),
                    "processor": platform.processor(),
                    "torch": torch.__version__,
                },
                "models": rows,
            },
        )


if __name__ == "__main__":
    main()

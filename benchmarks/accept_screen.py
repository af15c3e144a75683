"""Untimed acceptance screen: plain-Jacobi tokens/step and quality of model folders on a validation split.

For choosing between training variants (#30) before any of them gets the timed evaluation: many prompts, batched,
nothing timed, the validation split (never the test split the reported figures use). Not a reported figure.

    OMP_NUM_THREADS=1 python benchmarks/accept_screen.py --models smollm2-135m runs/json-demo/model \
        --prompts json-extract:validation --limit 96 --output runs/screen/demo.json

Prints one line per model: mean tokens/step with a 95% bootstrap interval over prompts, the prompt set's quality
(json-extract: valid / exact / fields), the degenerate rate and the share of outputs equal to the first model's.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch

from cllm.arguments import parse_settings, run_script
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.errors import UserError
from cllm.files import write_json
from cllm.hardware import recorded_cpu_flags
from cllm.models import eos_ids, load_model
from cllm.scoring import has_repeated_run, quality
from cllm.timing import bootstrap


@dataclasses.dataclass(kw_only=True)
class ScreenSettings:
    """`benchmarks/accept_screen.py`: untimed tokens/step and quality of model folders on a validation split.

    Args:
        models: model specs or exported folders; the first is the reference of `equal_to_first`.
        prompts: prompt set (a validation split: the test split is for the reported figures).
        limit: the first K prompts.
        n: Jacobi block size.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per Jacobi batch.
        dtype: model dtype (`auto`: the fastest here).
        init: initial guess of fresh block positions (`cllm.jacobi.INIT_STRATEGIES`).
        output: JSON file for the figures (per-prompt rates included); none: print only.
    """

    models: list[str] = dataclasses.field(default_factory=list)
    prompts: str = "json-extract:validation"
    limit: int = 96
    n: int = 16
    max_new_tokens: int = 64
    batch_size: int = 16
    dtype: str = "auto"
    init: str = "context"
    output: str | None = None


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
    rates = result.accepted_tokens_per_step
    mean, ci95 = bootstrap(rates, statistics.fmean)
    return {
        "model": spec,
        "tokens_per_step": mean,
        "ci95": ci95,
        "per_prompt": rates,
        "quality": quality(prompts[0].id.split("/")[0], prompts, texts),
        "degenerate_rate": sum(has_repeated_run(t) for t in result.tokens) / len(result.tokens),
        "tokens": result.tokens,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str]) -> None:
    args = parse_settings(ScreenSettings, argv, "benchmarks/accept_screen.py", __doc__)
    if not args.models:
        raise UserError("--models: give at least one model spec or folder")
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
                "command": "python benchmarks/accept_screen.py " + " ".join(argv),
                "settings": dataclasses.asdict(args),
                "machine": {
                    "cpu_flags": recorded_cpu_flags(),
                    "processor": platform.processor(),
                    "torch": torch.__version__,
                },
                "models": rows,
            },
        )


if __name__ == "__main__":
    run_script(main)

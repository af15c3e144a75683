"""SmolLM2 training step time and tokens/s: today's path (full logits, float32) against sliced logits and bf16 autocast.

    OMP_NUM_THREADS=1 python benchmarks/train_step.py            # SmolLM2-135M, CPU, the smollm2-135m.yaml batch

One step = `CLLMModule.compute_losses` (global consistency + AR on the fixed point, one pass over 2B rows, as
`fit` runs it), backward, gradient clipping and AdamW, on the same synthetic batch for every variant: 4 rows of
ctx + one 16-token block, contexts of the lengths below (like the stdlib-code trajectories: a chat prompt plus up
to 3 earlier blocks). Variants: {full logits, sliced logits} x {float32, bf16 autocast over float32 master weights
= Lightning's bf16-mixed}. The medians of `--repeats` steps after one warm-up; the JSON names the CPU flags and
what `dtype: auto` picks here.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from cllm.arguments import parse_settings, run_script
from cllm.data_modules.trajectory_data import collate, collate_packed
from cllm.errors import UserError
from cllm.files import write_json
from cllm.hardware import auto_dtype, recorded_cpu_flags
from cllm.module import CLLMModule, real_tokens
from cllm.records import Record

CONTEXTS = (104, 72, 136, 88)  # tokens before the block in each row


def batch(n: int, layout: str, vocabulary: int, seed: int = 0) -> dict:
    """One training batch of the given layout (`cllm`: one state per row, `pack`: 4 states per row)."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for context in CONTEXTS:
        tokens = torch.randint(5, vocabulary, (context + 6 * n,), generator=generator).tolist()
        fixed_point = tokens[context : context + n]
        states = [fixed_point[:j] + tokens[context + n * (1 + j) :][: n - j] for j in range(4)]
        record = Record("p", 0, tokens[: context - 8], tokens[context - 8 : context], states + [fixed_point])
        samples.append({"record": record, "state": states[1], "states": states})
    if layout == "pack":
        return collate_packed(samples, pad_id=0, n=n, max_length=1024)
    return collate(samples, pad_id=0, n=n, max_length=1024, next_state=False, use_labels=False)


def step_seconds(module: CLLMModule, data: dict, autocast: bool, repeats: int) -> tuple[float, float]:
    """(median seconds of a training step, its loss)."""
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
    times, loss = [], float("nan")
    for _ in range(repeats + 1):  # the first step is a warm-up
        start = time.perf_counter()
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            parts = module.compute_losses(data)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        loss = float(parts["loss"])
    return statistics.median(times[1:]), loss


@dataclass(kw_only=True)
class TrainStepSettings:
    """`benchmarks/train_step.py`: training step time of full against sliced logits, float32 against bf16 autocast.

    Args:
        model: model spec (cllm.models).
        n: block size (tokens per state).
        layouts: batch layouts measured: cllm (one state per row) | pack (4 states per row).
        repeats: timed steps per variant (their median; after one warm-up step).
        output: the JSON to write.
    """

    model: str = "smollm2-135m"
    n: int = 16
    layouts: list[Literal["cllm", "pack"]] = field(default_factory=lambda: ["cllm"])
    repeats: int = 3
    output: str = "docs/results/train_step.json"


def main(argv: list[str]) -> None:
    args = parse_settings(TrainStepSettings, argv, "benchmarks/train_step.py", __doc__)
    if args.n < 1 or args.repeats < 1:
        raise UserError(f"--n and --repeats must be >= 1, got {args.n} and {args.repeats}")

    choice = auto_dtype("cpu")
    rows = []
    for layout in args.layouts:
        for sliced in (False, True):
            module = CLLMModule(model=args.model, dtype="float32", n=args.n, sliced_logits=sliced)
            module.configure_model()
            data = batch(args.n, layout, module.model.config.vocab_size)
            tokens = real_tokens(data, args.n)
            for autocast in (False, True):
                seconds, loss = step_seconds(module, data, autocast, args.repeats)
                rows.append(
                    {
                        "layout": layout,
                        "logits": "sliced" if sliced else "full",
                        "compute": "bf16 autocast" if autocast else "float32",
                        "seconds": seconds,
                        "tokens_per_s": tokens / seconds,
                        "loss": loss,
                    }
                )
                print(rows[-1], flush=True)
            del module
    for layout in args.layouts:
        of_layout = [row for row in rows if row["layout"] == layout]
        today = next(r for r in of_layout if r["logits"] == "full" and r["compute"] == "float32")
        for row in of_layout:
            row["speedup_vs_today"] = today["seconds"] / row["seconds"]
    threads, flags = torch.get_num_threads(), recorded_cpu_flags()
    print(f"model={args.model} n={args.n} rows={len(CONTEXTS)} threads={threads} cpu={flags}")
    print(f"auto: {choice.name} ({choice.reason})")
    print(f"{'layout':>6} {'logits':>7} {'compute':>14} {'s/step':>7} {'tokens/s':>9} {'x today':>8}")
    for row in rows:
        print(
            f"{row['layout']:>6} {row['logits']:>7} {row['compute']:>14} {row['seconds']:7.2f} "
            f"{row['tokens_per_s']:9.1f} {row['speedup_vs_today']:8.2f}"
        )
    settings = {"model": args.model, "n": args.n, "contexts": CONTEXTS, "repeats": args.repeats}
    machine = {"cpu_flags": recorded_cpu_flags(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    auto = {"dtype": choice.name, "reason": choice.reason}
    write_json(args.output, {"settings": settings, "machine": machine, "auto": auto, "rows": rows})
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

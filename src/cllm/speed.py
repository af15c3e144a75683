"""Timing decoders against the fastest greedy AR, Spec-Bench style, and choosing n on the machine at hand.

A *run* decodes every prompt (in batches) with one decoder and records, per sample, the generated ids, the tokens
committed by each decode pass and the wall time of its batch. From a run:

- our figures: tokens/s = all generated tokens / all seconds; accepted tokens per step = generated tokens /
  decode passes per sequence, averaged (prefill excluded; AR = 1.0);
- Spec-Bench's (hemingkx/Spec-Bench, evaluation/speed.py): the mean over samples of each sample's tokens/s, and
  its speedup = that mean over the AR run's; per-sample records in its jsonl shape (`new_tokens`, `wall_time`,
  `accept_lengths` under `choices[0]`).

The AR baseline is the fastest of the variants tried ({eager HF generate, static cache + torch.compile} x dtypes),
and the report names the winner.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cllm.hardware import recorded_cpu_flags

CONVENTION = "generated tokens / decode forward passes, per sequence, mean"
Decoder = Callable[[list[list[int]]], tuple[list[list[int]], list[list[int]]]]  # batch -> (tokens, per pass)


@dataclass
class Run:
    """One decoder over all prompts: per sample, ids, tokens committed per pass, and its batch's wall time."""

    name: str
    tokens: list[list[int]]
    accepted_per_pass: list[list[int]]
    wall_times: list[float]
    batch_seconds: list[float]

    @property
    def seconds(self) -> float:
        return sum(self.batch_seconds)

    def figures(self, reference: list[list[int]] | None = None) -> dict:
        """The fields of bench's `"jacobi"` entry (and of every `"decoders"` entry)."""
        count = sum(map(len, self.tokens))
        rates = [len(t) / max(len(p), 1) for t, p in zip(self.tokens, self.accepted_per_pass)]
        out = {
            "tokens": count,
            "seconds": self.seconds,
            "tokens_per_s": count / max(self.seconds, 1e-9),
            "steps": sum(map(len, self.accepted_per_pass)),
            "accepted_tokens_per_step": sum(rates) / max(len(rates), 1),
            "accepted_tokens_per_step_convention": CONVENTION,
            "spec_bench_tokens_per_s": per_sample_rate(self),
        }
        if reference is not None:
            out["ar_agreement"] = sum(a == b for a, b in zip(self.tokens, reference)) / max(len(reference), 1)
        return out


def per_sample_rate(run: Run) -> float:
    """Spec-Bench's speed: the mean over samples of new tokens / wall time."""
    return statistics.fmean(len(t) / max(s, 1e-9) for t, s in zip(run.tokens, run.wall_times)) if run.tokens else 0.0


def spec_bench_speedup(run: Run, baseline: Run) -> float:
    return per_sample_rate(run) / max(per_sample_rate(baseline), 1e-9)


def timed_run(name: str, decoder: Decoder, prompts: list[list[int]], batch_size: int) -> Run:
    """Decode `prompts` in batches of `batch_size`; each sample's wall time is its batch's."""
    tokens, passes, walls, batches = [], [], [], []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        begin = time.perf_counter()
        batch_tokens, batch_passes = decoder(batch)
        seconds = time.perf_counter() - begin
        batches.append(seconds)
        tokens += batch_tokens
        passes += batch_passes
        walls += [seconds] * len(batch)
    return Run(name, tokens, passes, walls, batches)


def write_spec_bench_jsonl(path: Path, run: Run, ids: Sequence[str], model_id: str) -> None:
    """One line per sample in Spec-Bench's answer shape (readable by its evaluation/speed.py)."""
    lines = []
    samples = zip(ids, run.tokens, run.accepted_per_pass, run.wall_times)
    for i, (sample_id, tokens, passes, seconds) in enumerate(samples):
        choice = {"index": 0, "new_tokens": [len(tokens)], "wall_time": [seconds], "accept_lengths": list(passes)}
        lines.append(json.dumps({"question_id": sample_id, "answer_id": i, "model_id": model_id, "choices": [choice]}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def fastest(runs: Sequence[Run]) -> Run:
    """The AR variant with the highest tokens/s."""
    return max(runs, key=lambda run: sum(map(len, run.tokens)) / max(run.seconds, 1e-9))


def choose_n(measure: Callable[[int], Run], candidates: Sequence[int]) -> tuple[int, list[dict]]:
    """`--n auto`: for each candidate n, decode the warm-up prompts and measure accepted tokens per pass (TPF) and
    seconds per pass (the pass cost on this machine); pick the n maximising TPF / cost (= tokens/s)."""
    table = []
    for n in candidates:
        measure(n)  # first-call costs (allocation, kernels for this shape) are not the pass cost
        run = measure(n)
        passes = max(sum(map(len, run.accepted_per_pass)), 1)
        tpf = run.figures()["accepted_tokens_per_step"]
        cost = run.seconds / passes
        table.append({"n": n, "accepted_tokens_per_step": tpf, "seconds_per_pass": cost, "score": tpf / cost})
    best = max(table, key=lambda row: row["score"])
    return best["n"], table


def format_rows(rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def cpu_flags() -> list[str]:
    """The CPU features that decide matmul speed here (recorded beside every figure; `cllm.hardware` reads them)."""
    return recorded_cpu_flags()

"""Add the cross-fitted training gain to reports written before `cllm evaluate` computed it, from their records alone.

    python benchmarks/cross_fitted_gain.py --reports docs/results/json-jf-long docs/results/json-jf-1536

For every prompt set of a report with a base model: each side's runners (AR and every decoder, as timed) are read back
from the Spec-Bench records (per-prompt tokens/s: new tokens over wall time, prefill included, the timed prompts only),
`cllm.timing.cross_fitted_gain` pairs them, and the figure goes into `training_gain.<suite>.cross_fitted` of the
report's results.json; results.md is rendered again. Nothing is re-timed: the figure is what `cllm evaluate` computes
now from the same timings. A report whose records are missing is refused in one line before anything is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError
from cllm.evaluate_report import cross_fitted_line, markdown
from cllm.files import atomic_write_text, write_json
from cllm.spec_bench import timed_rates
from cllm.timing import cross_fitted_gain


@dataclass(kw_only=True)
class CrossFitSettings:
    """`benchmarks/cross_fitted_gain.py`: the cross-fitted training gain of existing reports.

    Args:
        reports: report folders (each with results.json and records/, a trained and a base model).
    """

    reports: list[str] = field(default_factory=list)


def refit(folder: Path) -> dict:
    """The report with `cross_fitted` added to each suite's training gain (not written)."""
    path = folder / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: no such report")
    report = json.loads(path.read_text())
    names = list(report.get("models", {}))
    if len(names) != 2 or not report.get("training_gain"):
        raise UserError(f"{path}: no training gain (a report of a trained and a base model)")
    for suite, gain in report["training_gain"].items():
        trained, base = (timed_rates(folder, report["models"][name][suite]) for name in names)
        gain["cross_fitted"] = cross_fitted_gain(trained, base)
    return report


def main(argv: list[str]) -> None:
    args = parse_settings(CrossFitSettings, argv, "benchmarks/cross_fitted_gain.py", __doc__)
    reports = {folder: refit(Path(folder)) for folder in args.reports}  # all checked before any is written
    for folder, report in reports.items():
        write_json(Path(folder) / "results.json", report)
        atomic_write_text(Path(folder) / "results.md", markdown(report))
        for suite, gain in report["training_gain"].items():
            crossed = gain["cross_fitted"]
            if crossed is None:
                print(f"{folder} {suite}: under 4 timed prompts, no cross-fitted gain")
                continue
            print(f"{folder} {suite}: warm-up choice {gain['median']:.2f}x. {cross_fitted_line(crossed)}")


if __name__ == "__main__":
    run_script(main)

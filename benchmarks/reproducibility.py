"""How far two runs of the same evaluation agree, from their reports alone (`cllm evaluate` / `cllm bench`).

    python benchmarks/reproducibility.py --reports docs/results/repro-base-recycle-1 docs/results/repro-base-recycle-2 \
        --decoder recycle --output docs/results/reproducibility.json

For one model, prompt set and decoder of both reports: each run's median speedup over AR with its 95% interval and
half-width; the gap between the two medians; and, prompt by prompt (the reports hold every timed prompt's ratio, in
the same order), how far a prompt's ratio moved between the runs against how far the prompts differ from each other.
An interval wider than the run-to-run gap comes from the prompts (some gain more than others), not from timing noise;
the half-width then shrinks as 1/sqrt(prompts), so the script also says how many prompts a 10% half-width needs.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError
from cllm.files import write_json
from cllm.spec_bench import answer_rate, read_answers

TARGET = 0.10  # the half-width the measurement issue asks of a report


@dataclass(kw_only=True)
class ReproducibilitySettings:
    """`benchmarks/reproducibility.py`: compare two runs of the same evaluation.

    Args:
        reports: the two report folders (each with results.json).
        model: the model's name in the reports.
        suite: the prompt set (default: the reports' only one).
        decoder: the decoder compared.
        output: results JSON ('' to print only).
    """

    reports: list[str] = field(default_factory=list)
    model: str = "cllm"
    suite: str | None = None
    decoder: str = "recycle"
    output: str = ""


def rates(path: Path) -> dict[str, float]:
    """question_id -> tokens/s of one Spec-Bench answer file (as the report timed it: prefill included)."""
    return {answer["question_id"]: answer_rate(answer) for answer in read_answers(path)}


def speedup_of(folder: str, model: str, suite: str | None, decoder: str) -> tuple[str, dict, dict]:
    """(suite, speedup_vs_ar with `per_prompt` {question_id: ratio} from the records, machine) of one decoder in
    one report, refused in one line where it is missing."""
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise UserError(f"{path}: no such report")
    report = json.loads(path.read_text())
    suites = {name: entry for name, entry in report.get("models", {}).get(model, {}).items() if name != "spec"}
    if suite is None and len(suites) == 1:
        suite = next(iter(suites))
    entry = suites.get(suite or "", {})
    if decoder not in entry.get("decoders", {}):
        raise UserError(f"{path}: no decoder {decoder!r} for model {model!r} on prompt set {suite!r}")
    ar, ours = (rates(Path(folder) / entry["records"][key]) for key in ("ar", decoder))
    per_prompt = {question: ours[question] / ar[question] for question in ar}
    return suite, {**entry["decoders"][decoder]["speedup_vs_ar"], "per_prompt": per_prompt}, report.get("machine", {})


def compare(first: dict, second: dict) -> dict:
    """The figures of two runs' `speedup_vs_ar`, each with `per_prompt` ratios by question id."""
    if set(first["per_prompt"]) != set(second["per_prompt"]) or not first["per_prompt"]:
        raise UserError("the runs timed different prompts: not the same evaluation")
    questions = sorted(first["per_prompt"])
    a, b = ([speed["per_prompt"][q] for q in questions] for speed in (first, second))
    runs = []
    for speed, ratios in ((first, a), (second, b)):
        lo, hi = speed["ci95"]
        half = (hi - lo) / 2 / speed["median"]
        runs.append({"median": speed["median"], "ci95": [lo, hi], "half_width": half})
        runs[-1]["median_from_records"] = statistics.median(ratios)  # the report's median, recomputed
        runs[-1]["prompts_for_10pct"] = math.ceil(len(a) * (half / TARGET) ** 2)  # half-width ~ 1/sqrt(prompts)
    moved = [abs(x / y - 1) for x, y in zip(a, b)]
    quartiles = statistics.quantiles(a, n=4)
    return {
        "n_prompts": len(a),
        "runs": runs,
        "median_gap": abs(first["median"] / second["median"] - 1),
        "per_prompt_change": {"median": statistics.median(moved), "max": max(moved)},
        "per_prompt_correlation": statistics.correlation(a, b),
        "prompt_spread": {"min": min(a), "q1": quartiles[0], "q3": quartiles[2], "max": max(a)},
    }


def main(argv: list[str]) -> None:
    args = parse_settings(ReproducibilitySettings, argv, "benchmarks/reproducibility.py", __doc__)
    if len(args.reports) != 2:
        raise UserError(f"--reports takes two report folders, got {len(args.reports)}")
    (suite, first, machine), (_, second, other) = (
        speedup_of(folder, args.model, args.suite, args.decoder) for folder in args.reports
    )
    figures = compare(first, second)
    result = {"reports": args.reports, "model": args.model, "suite": suite, "decoder": args.decoder, **figures}
    result["load_during_timing"] = [machine.get("load_during_timing"), other.get("load_during_timing")]
    for folder, run in zip(args.reports, figures["runs"]):
        lo, hi = run["ci95"]
        print(f"{folder}: {run['median']:.2f}x [{lo:.2f}, {hi:.2f}], half-width {run['half_width']:.1%}")
    change, spread = figures["per_prompt_change"], figures["prompt_spread"]
    print(
        f"medians {figures['median_gap']:.1%} apart; per prompt the ratio moved {change['median']:.1%} (median, max "
        f"{change['max']:.1%}) between runs, correlation {figures['per_prompt_correlation']:.2f}, while prompts "
        f"range {spread['min']:.2f}-{spread['max']:.2f}x (quartiles {spread['q1']:.2f}, {spread['q3']:.2f}); "
        f"a 10% half-width needs ~{max(run['prompts_for_10pct'] for run in figures['runs'])} prompts"
    )
    if args.output:
        write_json(args.output, result)
        print(f"wrote {args.output}")


if __name__ == "__main__":
    run_script(main)

"""`python -m cllm results`: docs/results.md (and README's excerpt) generated from the committed results JSON.

Every `results.json` under `--root` (at any depth) written by `cllm run` (it holds a `recipe` block) becomes one
row per prompt set: the recipe file and command, the machine's CPU flags and the date, plain-Jacobi tokens/step of
the base and the trained model, quality, the trained model's fastest decoder against AR and the training gain, each
with its 95% interval. Every other `cllm evaluate` / `cllm bench` report becomes one row per model, prompt set and
decoder, with its decoding (greedy or the sampling settings), quality and degenerate rate. Nothing else writes
figures into the docs: rerun this after committing a report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cllm.arguments import parse_settings
from cllm.errors import UserError
from cllm.files import atomic_write_text

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
QUALITY = ("valid", "exact", "fields", "pass_at_1")
HEADER = (
    "| recipe | prompts | tokens/step base -> trained (jacobi) | quality base -> trained | trained fastest x AR "
    "[95% CI] | training gain [95% CI] (cross-fitted) | machine, date |\n|---|---|---|---|---|---|---|"
)


@dataclass(kw_only=True)
class ResultsSettings:
    """`cllm results`: the results table from the committed reports.

    Args:
        root: folder searched for `*/results.json` written by `cllm run`.
        output: the markdown table to write.
        readme: README whose block between the results markers gets the same table ('' to leave it).
    """

    root: str = "docs/results"
    output: str = "docs/results.md"
    readme: str = "README.md"


def _interval(figure: dict | None) -> str:
    if not figure:
        return "-"
    lo, hi = figure["ci95"]
    return f"{figure['median']:.2f}x [{lo:.2f}, {hi:.2f}]"


def _quality(entry: dict) -> str:
    return ", ".join(f"{key} {entry[key]:.2f}" for key in QUALITY if key in entry) or "-"


def _flags(report: dict) -> str:
    """The CPU flags a report was measured with (the ISA's, not the settings'; the CPU's name when none)."""
    machine = report["machine"]
    return ",".join(f for f in machine["cpu_flags"] if "=" not in f) or machine["cpu"]


def _plain_jacobi(entry: dict) -> dict:
    """A model's plain Jacobi figures: eager `jacobi`'s, else `jacobi+compile`'s (the same iteration on the fast
    path: same outputs and passes, `tests/test_compiled.py`); {} when neither was timed."""
    decoders = entry.get("decoders", {})
    return decoders.get("jacobi") or decoders.get("jacobi+compile") or {}


def rows(report: dict, path: str) -> list[str]:
    """One table row per prompt set of one report."""
    recipe, models = report["recipe"], report["models"]
    trained = next(name for name in models if name != "base")
    out = []
    for suite, entry in models[trained].items():
        if suite == "spec":
            continue
        base = models.get("base", {}).get(suite, {})
        trained_jacobi, base_jacobi = _plain_jacobi(entry), _plain_jacobi(base)
        jacobi, before = trained_jacobi.get("tokens_per_step"), base_jacobi.get("tokens_per_step")
        tps = f"{before:.3f} -> **{jacobi:.3f}**" if jacobi and before else "-"
        if tps != "-" and trained_jacobi.get("degenerate_rate"):  # a loop inflates acceptance: the figure without
            if "tokens_per_step_non_degenerate" in trained_jacobi:  # (reports before it was measured lack it)
                clean = trained_jacobi["tokens_per_step_non_degenerate"]
                tps += f" ({clean:.3f} non-degenerate)" if clean is not None else " (every output degenerate)"
            tps += f", degen. {base_jacobi.get('degenerate_rate', 0):.2f} -> {trained_jacobi['degenerate_rate']:.2f}"
        fastest = entry["fastest"]
        decoder = next((d for d in entry["decoders"].values() if d["setting"] == fastest), None)
        speed = f"{_interval(decoder['speedup_vs_ar'])} ({fastest})" if decoder else f"1.00x ({fastest})"
        gain = report.get("training_gain", {}).get(suite)
        crossed = f" ({_interval(gain['cross_fitted'])})" if gain and gain.get("cross_fitted") else ""
        load = " (timed under load)" if report["machine"].get("under_load") else ""
        out.append(
            f"| [{Path(recipe['file']).name}]({path}) | {suite} ({entry['timed_prompts']} timed) | {tps} | "
            f"{_quality(base)} -> {_quality(entry)} | {speed} | {_interval(gain)}{crossed} "
            f"| {_flags(report)}, {recipe['date']}{load} |"
        )
    return out


EVALUATIONS = (
    "| report | model | prompts | decoding | decoder | tokens/step | x AR [95% CI] | CI half-width | = AR | quality | "
    "degen. | machine |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def evaluation_rows(report: dict, path: str, name: str) -> list[str]:
    """One row per model x suite x decoder of a `cllm evaluate` / `cllm bench` report (no recipe), named `name`."""
    out, flags = [], _flags(report)
    load = " (under load)" if report["machine"].get("under_load") else ""
    decoding = report.get("decoding", "greedy").split(" seed=")[0]
    for model_name, model in report["models"].items():
        for suite, entry in model.items():
            if suite == "spec":
                continue
            for d in entry["decoders"].values():
                speed = d["speedup_vs_ar"]
                half = (speed["ci95"][1] - speed["ci95"][0]) / 2 / speed["median"]
                out.append(
                    f"| [{name}]({path}) | {model_name} ({model['spec']}) | {suite} ({entry['timed_prompts']} timed) | "
                    f"{decoding} | {d['setting']} | {d['tokens_per_step']:.3f} | {_interval(speed)} | {half:.1%} | "
                    f"{d['agreement_with_ar']:.0%} | {_quality(d.get('quality') or {})} | "
                    f"{d['degenerate_rate']:.2f} | {flags}{load} |"
                )
    return out


def table(root: Path, page: Path, elsewhere: Path | None = None) -> str:
    """The recipe table, then (when there are any) the evaluations that ran outside a recipe, or, with `elsewhere`
    (the page that holds them), one line saying how many there are and where."""
    recipes, evaluations = [HEADER], [EVALUATIONS]
    for path in sorted(root.glob("**/results.json")):
        report = json.loads(path.read_text())
        if "models" not in report or "machine" not in report or "training_gain" not in report:
            continue  # not written by `cllm evaluate`
        link = os.path.relpath(path.parent / "results.md", page.parent)  # from the page the table is written into
        name = path.parent.relative_to(root).as_posix()
        (recipes if "recipe" in report else evaluations).extend(
            rows(report, link) if "recipe" in report else evaluation_rows(report, link, name)
        )
    if len(recipes) == 1 and len(evaluations) == 1:
        raise UserError(f"no results.json written by `cllm evaluate` or `cllm run` under {root}")
    text = "\n".join(recipes) if len(recipes) > 1 else ""
    if len(evaluations) > 1 and elsewhere is not None:
        link = os.path.relpath(elsewhere, page.parent)
        text += f"\n\nAnd {len(evaluations) - 1} rows of evaluations outside a recipe: [{elsewhere.name}]({link})."
    elif len(evaluations) > 1:
        text += ("\n\n" if text else "") + "Evaluations outside a recipe:\n\n" + "\n".join(evaluations)
    return text


def replace_block(text: str, block: str, where: str) -> str:
    if BEGIN not in text or END not in text:
        raise UserError(f"{where}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    return f"{head}{BEGIN}\n{block}\n{END}{rest.split(END, 1)[1]}"


def write(settings: ResultsSettings) -> str:
    body = table(Path(settings.root), Path(settings.output))
    page = (
        "# Results\n\nGenerated by `python -m cllm results` from the reports under "
        f"`{settings.root}/` (written by `python -m cllm run --recipe FILE`, or `cllm evaluate` / `cllm bench`); "
        "do not edit by hand.\n"
        "Conventions: tokens/step = generated tokens / decode passes per sequence, averaged (AR = 1.0); x AR and the "
        "training gain are medians of per-prompt tokens/s ratios, paired and timed back to back at batch 1, with "
        "95% bootstrap intervals; the training gain pairs each model's fastest runner chosen on the warm-ups, and in "
        "brackets after it with the choices cross-fitted on the timed prompts (the method: docs/evaluation.md).\n\n"
        f"{BEGIN}\n{body}\n{END}\n"
    )
    readme, new_readme = Path(settings.readme), None
    if settings.readme:  # checked before anything is written
        if not readme.is_file():
            raise UserError(f"--readme {settings.readme}: no such file ('' to leave the README alone)")
        excerpt = table(Path(settings.root), readme, elsewhere=Path(settings.output))
        new_readme = replace_block(readme.read_text(), excerpt, settings.readme)
    atomic_write_text(Path(settings.output), page)
    if new_readme is not None:
        atomic_write_text(readme, new_readme)
    print(body)
    return body


def main(argv: list[str]) -> None:
    write(parse_settings(ResultsSettings, argv, "cllm results", __doc__))

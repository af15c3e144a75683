"""The objective ablation: CLLM (one state per row), CLLM pack4 and Jacobi Forcing on the same trajectories, the same
optimizer steps and schedule, then the base model and each variant on the test split, in one report.

    python benchmarks/forcing_ablation.py --data /work/wt/data/json-extract-n16        # json-extract, 40 steps
    python benchmarks/forcing_ablation.py --domain code --data DATA --steps 40         # stdlib-code
    python benchmarks/forcing_ablation.py --report-only --output docs/results/forcing-ablation-json

Each variant is `cllm fit --config smollm2-135m.yaml [--config DOMAIN] [--config OVERLAY]` into WORK/VARIANT, then
`cllm export` into WORK/VARIANT/model; a variant whose model folder exists is not trained again (rerun to resume).
Validation (held-out prompts of the domain, n = 16, every --val-every steps): accepted tokens per step, base
agreement, degenerate rate, from the fit's CSV log; seconds per step = median of `train/seconds_per_step`.
The test split: accepted tokens per step (n = 16), quality, degenerate rate, outputs equal to the base model's.
Gain = a variant's tokens per step minus the base model's, at the same step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import yaml  # noqa: E402
from headline import run_stage  # noqa: E402  (a sibling script)
from plotting import pyplot  # noqa: E402

from cllm.arguments import resolve_config  # noqa: E402
from cllm.data_modules.prompts import load_prompts  # noqa: E402
from cllm.files import write_json  # noqa: E402
from cllm.hardware import recorded_cpu_flags  # noqa: E402
from cllm.scoring import compare_with_base, evaluate_model  # noqa: E402
from cllm.tracking import read_metrics_csv  # noqa: E402

VARIANTS = {"cllm": [], "pack4": ["ablations/pack4.yaml"], "jacobi_forcing": ["objectives/jacobi_forcing.yaml"]}
DOMAINS = {
    "json": {"overlays": ["domains/json-extract.yaml"], "set": "json-extract", "test": "json-extract:test"},
    "code": {"overlays": [], "set": "stdlib-code", "test": "stdlib-code:test"},
}
CURVES = ("val/accepted_tokens_per_step", "val/base_agreement", "val/degenerate_rate")


def fit_variant(name: str, args: argparse.Namespace, work: Path, timings: dict) -> Path:
    """Train and export one variant (skipped when its model folder exists); returns the model folder."""
    root, model = work / name, work / name / "model"
    if (model / "config.json").is_file():
        return model
    python = [sys.executable, "-m", "cllm"]
    checkpoints = sorted(root.rglob(f"*step={args.steps}.ckpt"), key=lambda p: p.stat().st_mtime)
    if checkpoints:  # trained already, the export is missing
        export = [*python, "export", "--ckpt", str(checkpoints[-1]), "--output", str(model)]
        run_stage(f"export {name}", export, root / "export.log", timings)
        return model
    fit = [
        *python,
        "fit",
        "--config",
        args.config,
        *(f"--config={overlay}" for overlay in DOMAINS[args.domain]["overlays"] + VARIANTS[name]),
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        f"--trainer.max_steps={args.steps}",
        f"--trainer.val_check_interval={args.val_every}",
        f"--data.init_args.path={args.data}",
        *args.fit_args,
    ]
    root.mkdir(parents=True, exist_ok=True)
    run_stage(f"fit {name}", fit, root / "fit.log", timings)
    checkpoints = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    run_stage(
        f"export {name}",
        [*python, "export", "--ckpt", str(checkpoints[-1]), "--output", str(model)],
        root / "export.log",
        timings,
    )
    return model


def cached_evaluate(spec: str, folder: Path, prompts: dict, evaluation: dict) -> dict:
    """`cllm.scoring.evaluate_model` of one model on the test prompts, kept in folder/test.json (greedy decoding
    repeats exactly), so a report with one more variant decodes only that one."""
    key = {"spec": spec, "prompts": {k: [p.id for p in v] for k, v in prompts.items()}, **evaluation}
    path = folder / "test.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["key"] == key:
            return stored["report"]
    report = evaluate_model(spec, prompts, **evaluation)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(path, {"key": key, "report": report})
    return report


def read_log(root: Path, val_every: int) -> dict:
    """Validation curves by step and the median seconds per training step, from the fit's CSV log.

    Lightning logs a validation's epoch-level metrics at the step before the one it follows (39 after step 40):
    those are shown at the step they measured."""
    curves: dict[str, dict[int, float]] = {key: {} for key in CURVES}
    seconds, losses = [], {}
    for row in read_metrics_csv(root):
        step = int(row["step"])
        measured = step + 1 if step > 0 and (step + 1) % val_every == 0 else step
        for key in CURVES:
            if key in row:
                curves[key][measured] = row[key]
        if "train/seconds_per_step" in row:
            seconds.append(row["train/seconds_per_step"])
        losses.update({key: row[key] for key in ("train/consistency_loss", "train/ar_loss") if key in row})
    return {
        "curves": {key: sorted(values.items()) for key, values in curves.items()},
        "seconds_per_step": statistics.median(seconds) if seconds else None,
        "last_train_losses": losses,
    }


def gains(results: dict) -> dict:
    """Per variant and validation step: tokens per step minus the base's; and on the test split."""
    base_val = dict(results["variants"][next(iter(results["variants"]))]["curves"][CURVES[0]]).get(0)
    table = {}
    test_base = results["test"]["base"]["accepted_tokens_per_step"] if results["test"] else None
    for name, entry in results["variants"].items():
        curve = dict(entry["curves"][CURVES[0]])
        table[name] = {
            "validation": [[step, value - base_val] for step, value in curve.items() if base_val is not None],
            "test": results["test"][name]["accepted_tokens_per_step"] - test_base if name in results["test"] else None,
        }
    return table


def markdown(results: dict) -> str:
    names = list(results["variants"])
    gain = results["gains"]
    steps = sorted({step for name in names for step, _ in results["variants"][name]["curves"][CURVES[0]]})
    lines = [
        f"# Objective ablation on {results['domain']}: CLLM vs CLLM pack4 vs Jacobi Forcing",
        "",
        f"Command: `{results['command']}`; machine: {results['machine']}; CPU flags: {results['cpu_flags']}.",
        f"Same trajectories (`{results['data']}`), {results['steps']} optimizer steps each, batch of "
        f"{results['batch_size']} rows, the same lr schedule; validation every {results['val_every']} steps on the "
        "held-out validation prompts (n = 16). Gain = tokens per step minus the base model's.",
        "",
        "## Held-out validation, accepted tokens per step (n = 16) by step",
        "",
        "| variant | s/step | " + " | ".join(str(step) for step in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for name in names:
        entry = results["variants"][name]
        curve = dict(entry["curves"][CURVES[0]])
        sps = entry["seconds_per_step"]
        cells = " | ".join(f"{curve[step]:.3f}" if step in curve else "" for step in steps)
        lines.append(f"| {name} | {sps:.1f} | {cells} |" if sps else f"| {name} | - | {cells} |")
    lines += ["", "| variant | " + " | ".join(f"base agreement / degenerate at {s}" for s in steps[1:]) + " |"]
    lines.append("|---|" + "---|" * len(steps[1:]))
    for name in names:
        agreement = dict(results["variants"][name]["curves"][CURVES[1]])
        degenerate = dict(results["variants"][name]["curves"][CURVES[2]])
        cells = " | ".join(
            f"{agreement.get(s, float('nan')):.2f} / {degenerate.get(s, float('nan')):.3f}" for s in steps[1:]
        )
        lines.append(f"| {name} | {cells} |")
    if "pack4" in gain and "jacobi_forcing" in gain:
        lines += ["", "Jacobi Forcing's gain over pack4's (the goal: >= 1.5x at equal steps):", ""]
        lines.append("| step | pack4 gain | JF gain | JF / pack4 |")
        lines.append("|---|---|---|---|")
        for step in steps[1:]:
            pack = dict(gain["pack4"]["validation"]).get(step)
            forcing = dict(gain["jacobi_forcing"]["validation"]).get(step)
            if pack is not None and forcing is not None:
                ratio = f"{forcing / pack:.2f}x" if pack > 0 else "-"
                lines.append(f"| {step} | {pack:+.3f} | {forcing:+.3f} | {ratio} |")
    test = results["test"]
    if not test:
        return "\n".join(lines + ["", "Test split: not decoded in this report (`--skip-test`)."]) + "\n"
    lines += [
        "",
        f"## Test split ({results['test_set']}, {test['base']['num_prompts']} prompts, n = 16, "
        f"max_new_tokens {results['max_new_tokens']})",
        "",
        "| model | accepted tok/step | gain | quality | degenerate | = base output | common prefix with base |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in ["base", *names]:
        if name not in test:
            continue
        entry = test[name]
        scores = ", ".join(f"{k} {v:.3f}" for k, v in entry["quality"].items()) or "-"
        delta = "-" if name == "base" else f"{gain[name]['test']:+.3f}"
        lines.append(
            f"| {name} | {entry['accepted_tokens_per_step']:.3f} | {delta} | {scores} | {entry['degenerate_rate']:.3f} "
            f"| {entry.get('exact_match_vs_base', 1.0):.3f} | {entry.get('common_prefix_vs_base', 1.0):.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, output: Path) -> list[str]:
    plt = pyplot()
    if plt is None:
        return []
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, entry in results["variants"].items():
        curve = entry["curves"][CURVES[0]]
        if curve:
            axis.plot(*zip(*curve), "o-", label=name)
    axis.set(title=f"{results['domain']}: held-out accepted tokens/step (n=16)", xlabel="step", ylabel="tokens/step")
    axis.legend()
    figure.tight_layout()
    figure.savefig(output / "validation_curves.png", dpi=100)
    plt.close("all")
    return ["validation_curves.png"]


def cpu_flags() -> str:
    return " ".join(recorded_cpu_flags()) or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=sorted(DOMAINS), default="json")
    parser.add_argument("--data", type=Path, required=False, help="trajectory folder shared by every variant")
    parser.add_argument("--config", default="smollm2-135m.yaml")
    parser.add_argument("--base", default="smollm2-135m", help="the base model (the config's model.init_args.model)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--val-every", type=int, default=20)
    parser.add_argument("--test-limit", type=int, default=48, help="test-split prompts")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/forcing-ablation"))
    parser.add_argument("--output", type=Path, default=None, help="default: docs/results/forcing-ablation-DOMAIN")
    parser.add_argument("--report-only", action="store_true", help="re-render from --output's results.json")
    parser.add_argument("--fit-only", action="store_true", help="train and export the variants, no report")
    parser.add_argument("--skip-test", action="store_true", help="report the validation curves only (no decoding)")
    parser.add_argument(
        "--headline", type=Path, help="also put the tables between this domain's markers (markers()) in this file"
    )
    parser.add_argument("fit_args", nargs="*", help="extra overrides for every `cllm fit` (after --)")
    args = parser.parse_args()
    output = args.output or Path("docs/results") / f"forcing-ablation-{args.domain}"
    output.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((output / "results.json").read_text())
    else:
        if args.data is None:
            parser.error("--data is required (unless --report-only)")
        work = args.work_dir / args.domain
        timings: dict[str, float] = {}
        models = {name: fit_variant(name, args, work, timings) for name in args.variants}
        if args.fit_only:
            return
        start = time.perf_counter()
        domain = DOMAINS[args.domain]
        test = {}
        if not args.skip_test:
            prompts = {domain["set"]: load_prompts(domain["test"], limit=args.test_limit)}
            evaluation = {"n": 16, "max_new_tokens": args.max_new_tokens}
            base = cached_evaluate(args.base, work / "base", prompts, evaluation)
            test = {"base": base[domain["set"]]}
            for name, folder in models.items():
                report = cached_evaluate(str(folder), work / name, prompts, evaluation)
                compare_with_base(base, report)
                test[name] = report[domain["set"]]
            for entry in test.values():
                entry["output_lengths"] = [len(o) for o in entry.pop("outputs")]
        timings["test"] = time.perf_counter() - start
        results = {
            "domain": args.domain,
            "command": " ".join(["python benchmarks/forcing_ablation.py", *sys.argv[1:]]),
            "machine": f"{torch.get_num_threads()} torch threads, {sys.platform}",
            "cpu_flags": cpu_flags(),
            "data": str(args.data),
            "steps": args.steps,
            "val_every": args.val_every,
            "batch_size": yaml.safe_load(Path(resolve_config(args.config)).read_text())["data"]["init_args"][
                "batch_size"
            ],
            "max_new_tokens": args.max_new_tokens,
            "test_set": domain["test"],
            "timings": timings,
            "variants": {name: read_log(work / name, args.val_every) for name in args.variants},
            "test": test,
        }
        results["gains"] = gains(results)
    write_json(output / "results.json", results)
    results["plots"] = plot(results, output)
    write_json(output / "results.json", results)
    (output / "results.md").write_text(markdown(results))
    print(markdown(results))
    if args.headline:
        insert_tables(args.headline, markdown(results), output, results["domain"])


def markers(domain: str) -> tuple[str, str]:
    """The markdown markers a domain's tables go between, e.g. `<!-- forcing-ablation-code:begin -->`."""
    return f"<!-- forcing-ablation-{domain}:begin -->", f"<!-- forcing-ablation-{domain}:end -->"


def insert_tables(path: Path, report: str, output: Path, domain: str) -> None:
    """Replace what stands between the domain's markers in `path` with the report's tables (its title dropped)."""
    text = path.read_text()
    begin, end = markers(domain)
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: no {begin} ... {end} markers to put the tables between")
    body = report.split("\n", 1)[1].replace("## ", "#### ")
    picture = output / "validation_curves.png"
    plot = f"![validation curves]({os.path.relpath(picture, path.parent)})" if picture.is_file() else ""
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{body.strip()}\n\n{plot}\n{end}{tail}")


if __name__ == "__main__":
    main()

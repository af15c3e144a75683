"""The headline benchmark: a base model, from nothing to a CLLM, base vs CLLM in one report.

    python benchmarks/headline.py                  # the full pipeline (<= 90 minutes on a 2-core CPU)
    python benchmarks/headline.py --quick          # a smoke-sized run (<= 10 minutes)
    python benchmarks/headline.py --suite json --profile demo   # `make demo`: the effect within 30 minutes
    python benchmarks/headline.py --suite json     # the narrow domain (json-extract), reported separately
    python benchmarks/headline.py --skip-fit --eval-prompts FILE.jsonl   # base and CLLM on any prompt file

A profile (`--suite` x `--profile`, `--quick` = `--profile quick`) is the YAML overlay
`configs/headline/SUITE-PROFILE.yaml`: its `headline:` block says what to evaluate (prompt sets, prompt counts,
max_new_tokens, the n values, decoders and AR dtypes timed, extra fit overlays); the rest of it overlays
`cllm fit`. The base model (`model.init_args.model`) and the trained block size n (`data.init_args.n`) come from
the resolved fit config (`--config`, default smollm2-135m.yaml, + the suite's domain overlays + the profile).

Stages: (1+2) `python -m cllm fit` collects the trajectories when the folder is missing, then trains; (3)
`python -m cllm export` turns the last checkpoint into a model folder; (4) base and CLLM are evaluated in this
process (`cllm.evaluation.evaluate_model`): accepted tokens per Jacobi step, Jacobi vs greedy-AR tokens/s (batch 1,
per prompt), quality (HumanEval pass@1 in a sandboxed subprocess, json-extract scores), exact match of CLLM vs base
greedy output, degenerate-repetition rate; (5) JSON, markdown and PNG plots in --output. Timings are wall-clock on
whatever machine runs this; ratios are within one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from headline_report import markdown, plots, summary

from cllm.arguments import bundled_config_dir, resolve_config
from cllm.data_modules.prompts import load_prompts
from cllm.errors import UserError
from cllm.evaluation import require_sandbox
from cllm.files import write_json
from cllm.hardware import auto_dtype, emulate_avx2, recorded_cpu_flags
from cllm.records import block_size
from cllm.scoring import compare_with_base, evaluate_model
from cllm.tracking import read_metrics_csv

SUITES = ("broad", "json")
PYTHON = [sys.executable, "-m", "cllm"]


def load_profile(suite: str, name: str) -> tuple[dict, dict]:
    """(the `headline:` settings, the fit overlay) of `configs/headline/SUITE-NAME.yaml`."""
    overlay = yaml.safe_load((bundled_config_dir() / "headline" / f"{suite}-{name}.yaml").read_text()) or {}
    return overlay.pop("headline"), overlay


def fit_config(configs: list[str], fit_args: list[str]) -> dict:
    """The fit config as `cllm fit` resolves it (`--print_config`): the one source of the base model and n."""
    command = [*PYTHON, "fit", *(f"--config={c}" for c in configs), *fit_args, "--print_config"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise UserError(f"cannot resolve the fit config {configs}: {done.stderr.strip().splitlines()[-1:]}")
    return yaml.safe_load(done.stdout)


def run_stage(name: str, command: list[str], log: Path, timings: dict) -> None:
    print(f"== {name}: {' '.join(command)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False)
    timings[name] = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"stage {name} failed (exit {done.returncode}); see {log}")


def latest_checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"no checkpoint under {root}")
    return found[-1]


def validation_curve(fit_root: Path) -> list[tuple[int, float]]:
    """(step, val/accepted_tokens_per_step) from the fit's CSV logs."""
    key = "val/accepted_tokens_per_step"
    return sorted((int(row["step"]), row[key]) for row in read_metrics_csv(fit_root) if key in row)


def ar_dtypes(names: list[str]) -> list[str]:
    """The AR dtypes to time, `auto` resolved for this machine (cllm.hardware) and duplicates dropped, in order."""
    resolved = [auto_dtype("cuda" if torch.cuda.is_available() else "cpu").name if n == "auto" else n for n in names]
    return list(dict.fromkeys(resolved))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke-sized run (<= 10 minutes): --profile quick")
    parser.add_argument("--profile", default="full", help="configs/headline/SUITE-PROFILE.yaml: full, quick, demo")
    parser.add_argument("--suite", choices=SUITES, default="broad", help="broad: stdlib-code + HumanEval; json")
    parser.add_argument("--config", default="smollm2-135m.yaml", help="base fit config: the base model and n")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/headline"))
    parser.add_argument("--output", type=Path, default=None, help="default: docs/results/<the profile's output>")
    parser.add_argument("--skip-fit", action="store_true", help="reuse the model already exported in --work-dir")
    parser.add_argument("--eval-prompts", default=None, help="evaluate base and CLLM on this prompt file instead")
    parser.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        help="greedy AR dtypes; the fastest is the baseline (default: the profile's `dtypes`, else float32)",
    )
    parser.add_argument("--speed-limit", type=int, default=None, help="prompts per set timed (0: no timing)")
    parser.add_argument("--report-only", action="store_true", help="re-render --output's results.json")
    parser.add_argument(
        "--emulate-avx2",
        action="store_true",
        help="run as on an AVX2-only CPU (PyTorch, oneDNN and MKL capped at AVX2; recorded beside the CPU flags)",
    )
    parser.add_argument(
        "--unsafe-exec",
        action="store_true",
        help="run model-written HumanEval code even without the bubblewrap sandbox (only on a throwaway machine)",
    )
    parser.add_argument("fit_args", nargs="*", help="extra overrides passed to `cllm fit` (after --)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.emulate_avx2:
        emulate_avx2([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    started = time.perf_counter()
    name = "quick" if args.quick else args.profile
    profile, overlay = load_profile(args.suite, name)
    dtypes = ar_dtypes(args.dtypes or profile.get("dtypes") or ["float32"])
    if args.speed_limit is not None:
        profile["speed_limit"] = args.speed_limit
    sets = profile["sets"]
    if args.eval_prompts:
        sets = {Path(args.eval_prompts).stem: args.eval_prompts}
    output = args.output or Path("docs/results") / (
        f"eval-{Path(args.eval_prompts).stem}" if args.eval_prompts else profile["output"]
    )
    if args.report_only:
        results = json.loads((output / "results.json").read_text())
        results["plots"] = plots(results, output)
        write_json(output / "results.json", results)
        (output / "results.md").write_text(markdown(results))
        print(f"re-rendered {output}/results.md and {len(results['plots'])} plots")
        return
    if "humaneval" in sets.values():
        require_sandbox(args.unsafe_exec)  # before hours of training, not after
    work = args.work_dir / f"{args.suite}-{name}"
    work.mkdir(parents=True, exist_ok=True)
    output.mkdir(parents=True, exist_ok=True)
    configs = [resolve_config(args.config), *(resolve_config(o) for o in profile["overlays"])]
    if overlay:
        (work / "profile.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
        configs.append(str(work / "profile.yaml"))
    fit_args = [
        f"--trainer.default_root_dir={work / 'fit'}",
        f"--trainer.logger.init_args.save_dir={work / 'fit'}",
        f"--data.init_args.path={work / 'trajectories'}",
        *args.fit_args,
    ]
    config = fit_config(configs, fit_args)
    base_model = config["model"]["init_args"]["model"]
    n, _ = block_size(config["data"]["init_args"]["path"], config["data"]["init_args"].get("n"))
    timings: dict[str, float] = {}
    exported = work / "cllm-model"
    if not args.skip_fit:
        fit = [*PYTHON, "fit", *(f"--config={c}" for c in configs), *fit_args]
        run_stage("collect+fit", fit, work / "fit.log", timings)
        export = [*PYTHON, "export", "--ckpt", str(latest_checkpoint(work / "fit")), "--output", str(exported)]
        run_stage("export", export, work / "export.log", timings)

    start = time.perf_counter()
    prompt_sets = {key: load_prompts(source, limit=profile["quality_limit"]) for key, source in sets.items()}
    evaluation = {
        "n": n,
        "max_new_tokens": profile["max_new_tokens"],
        "speed_limit": profile["speed_limit"],
        "n_values": profile["n_values"] or [n],
        "dtypes": tuple(dtypes),
        "unsafe_exec": args.unsafe_exec,
        "decoders": tuple(profile.get("decoders") or ["jacobi"]),
        "repeats": profile.get("repeats", 1),
        "compile_ar": profile.get("compile_ar", False),
    }
    models = {
        key: evaluate_model(spec, prompt_sets, **evaluation)
        for key, spec in [("base", base_model), ("cllm", str(exported))]
    }
    compare_with_base(models["base"], models["cllm"])
    timings["evaluate"] = time.perf_counter() - start
    for model in models.values():  # token lists are bulky; keep them out of the report JSON
        for entry in model.values():
            entry["output_lengths"] = [len(o) for o in entry.pop("outputs")]
    results = {
        "title": profile["title"].format(model=base_model) if not args.eval_prompts else f"{base_model} on {sets}",
        "suite": args.suite,
        "sets": sets,
        "profile": name,
        "command": " ".join(["python benchmarks/headline.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{torch.get_num_threads()} torch threads, {sys.platform}, CPU flags {recorded_cpu_flags()}",
        "cpu_flags": recorded_cpu_flags(),
        "settings": {k: v for k, v in profile.items() if k not in ("title", "sets", "output", "overlays")}
        | {"dtypes": dtypes}
        | {"n": n, "base_model": base_model, "config": configs, "fit_overrides": args.fit_args},
        "timings": timings,
        "models": models,
        "validation_curve": validation_curve(work / "fit"),
    }
    timings["total"] = time.perf_counter() - started
    write_json(output / "results.json", results)  # first, so a plotting failure loses no measurement
    results["plots"] = plots(results, output)
    write_json(output / "results.json", results)
    (output / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(summary(results, output))
    print(f"wrote {output}/results.json, results.md and {len(results['plots'])} plots")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        sys.exit(f"headline: error: {err}")

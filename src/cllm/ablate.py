"""`python -m cllm ablate`: run ablation overlays on a base config, then collect their final metrics into a table.

    python -m cllm ablate --base tiny.yaml                        # baseline + every bundled configs/ablations/*.yaml
    python -m cllm ablate --base tiny.yaml   --overlays configs/ablations/n8.yaml --trainer.max_steps=50
    python -m cllm ablate --base tiny.yaml   --count              # how many runs (size of the SLURM array)
    python -m cllm ablate --base tiny.yaml   --index 3            # run number 3 only, in this process (SLURM array)
    python -m cllm ablate --collect runs/ablate --output docs/ablations.md   # also writes docs/ablations.csv

Unknown `--key=value` arguments (and all after a lone `--`) are passed to every `cllm fit`; `--config FILE` is a
YAML file of ablate's own options, as for every command.

Each run is `cllm fit --config BASE [--config OVERLAY] --trainer.default_root_dir=ROOT/NAME [overrides]`, NAME being
the overlay's file stem (`baseline` for the base alone). The collector reads each run folder's CSVLogger
`metrics.csv` files, or else its W&B run files (`wandb/*run-*/run-*.wandb`), and keeps the last value of every metric.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from cllm.arguments import bundled_config_dir, parse_settings, resolve_config
from cllm.errors import UserError
from cllm.files import atomic_write_text
from cllm.lightning_cli import run_lightning
from cllm.tracking import read_metrics_csv, read_offline_run

BASELINE = "baseline"
RECORD = "ablate.json"  # per run: command, return code, seconds, overlay delta
LOGGERS = "loggers.yaml"  # per run: the loggers of the base/overlay, writing into the run folder
# Shown first, in this order, when present; then any other val/* metric, then train losses.
PREFERRED = (
    "val/accepted_tokens_per_step",
    "val/base_agreement",
    "val/degenerate_rate",
    "val/loss",
    "val/consistency_loss",
    "val/ar_loss",
    "train/loss",
)
# Throughput is left out: on a shared machine it measures the neighbours (bench it with `cllm bench`).
SKIPPED = (
    "train/lr",
    "train/tokens_per_s",
    "train/seconds_per_step",
    "train/samples_per_s",
    "train/mfu",
    "train/grad_norm",
    "val/jacobi_tokens_per_s",
    "epoch",
    "step",
)
BEGIN, END = "<!-- ablate:begin -->", "<!-- ablate:end -->"


@dataclass(kw_only=True)
class AblateSettings:
    """`cllm ablate`: run ablation overlays on a base config, or collect their final metrics into a table.

    Args:
        base: base config of every run (NAME.yaml: current folder first, then the bundled configs/).
        overlays: overlay YAML files or folders (default: the bundled configs/ablations/).
        root: one run folder per overlay under ROOT.
        baseline: also run the base config alone (`--no_baseline`: do not).
        index: run only run number INDEX (0-based), in this process.
        count: print the number of runs and exit.
        dry_run: print the commands, run nothing.
        collect: build the table from the run folders under this folder.
        output: with --collect: markdown file to write (a .csv is written beside it).
        fit_args: overrides passed to every `cllm fit` (also any --key=value that ablate does not know).
    """

    base: str | None = None
    overlays: list[str] | None = None
    root: str = "runs/ablate"
    baseline: bool = True
    index: int | None = None
    count: bool = False
    dry_run: bool = False
    collect: str | None = None
    output: str | None = None
    fit_args: list[str] = field(default_factory=list)


def split_fit_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(ablate's own arguments, the overrides for `cllm fit`): the flags ablate does not know, with their values,
    and everything after a lone `--`."""
    known = {f.name for f in fields(AblateSettings)} | {"config", "print_config", "help", "no_baseline"}
    own, fit = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return own, fit + argv[i + 1 :]
        name = arg[2:].split("=", 1)[0].replace("-", "_") if arg.startswith("--") else None
        target = own if name is None or name in known else fit
        target.append(arg)
        i += 1
        if name is not None and name not in known and "=" not in arg:
            while i < len(argv) and not argv[i].startswith("-"):
                fit.append(argv[i])
                i += 1
    return own, fit


def overlay_files(overlays: list[str] | None) -> list[Path]:
    """Overlay files, sorted by name within each folder; the bundled `configs/ablations/` by default."""
    sources = overlays or [str(bundled_config_dir() / "ablations")]
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            files += sorted(path.glob("*.yaml"))
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"overlay {source!r} is neither a YAML file nor a folder")
    names = [f.stem for f in files]
    duplicates = sorted({n for n in names if names.count(n) > 1} | ({BASELINE} & set(names)))
    if duplicates:
        raise UserError(f"overlay names must be unique and not {BASELINE!r} (they name the run folders): {duplicates}")
    return files


def plan_runs(overlays: list[Path], baseline: bool) -> list[tuple[str, Path | None]]:
    """(run name, overlay or None) in run/array-index order: the baseline first, then the overlays."""
    return ([(BASELINE, None)] if baseline else []) + [(path.stem, path) for path in overlays]


def run_loggers(config_files: list[str], name: str, run_dir: Path) -> list[dict[str, Any]]:
    """The configs' loggers with every `save_dir` set to the run folder; a W&B run named, grouped and tagged.

    Written as an extra `--config` so every logger of every run writes under ROOT/NAME, whatever the base says.
    Empty when the configs set no logger (Lightning's default CSVLogger already writes under default_root_dir).
    """
    entries: list[Any] = []
    for file in config_files:
        data = yaml.safe_load(Path(file).read_text()) or {}
        logger = (data.get("trainer") or {}).get("logger")
        if logger is not None:  # a later config replaces the logger of an earlier one
            entries = logger if isinstance(logger, list) else [logger]
    loggers = []
    for entry in entries:
        if not isinstance(entry, dict) or "class_path" not in entry:
            continue
        init_args = {**(entry.get("init_args") or {}), "save_dir": str(run_dir)}
        if entry["class_path"] == "cllm.tracking.WandbLogger":
            # One W&B group per sweep (ROOT's name), the run and a tag named after the overlay: compare in the UI.
            init_args["name"] = name
            init_args.setdefault("group", run_dir.parent.name)
            init_args["tags"] = [*(init_args.get("tags") or []), name]
        loggers.append({"class_path": entry["class_path"], "init_args": init_args})
    return loggers


def fit_args(base: str, name: str, overlay: Path | None, root: Path, extra: list[str]) -> list[str]:
    """Arguments of `cllm fit` for one run (after the `fit`); see `write_logger_config` for the last `--config`."""
    configs = [base] + ([str(overlay)] if overlay else [])
    if run_loggers(configs, name, root / name):
        configs.append(str(root / name / LOGGERS))
    args = [part for config in configs for part in ("--config", config)]
    return [*args, f"--trainer.default_root_dir={root / name}", *extra]


def write_logger_config(base: str, name: str, overlay: Path | None, root: Path) -> None:
    configs = [base] + ([str(overlay)] if overlay else [])
    loggers = run_loggers(configs, name, root / name)
    if loggers:
        atomic_write_text(root / name / LOGGERS, yaml.safe_dump({"trainer": {"logger": loggers}}, sort_keys=False))


def overlay_delta(overlay: Path | None) -> str:
    """`key=value` pairs an overlay sets (the W&B logger block left out): the table's description of a run."""
    if overlay is None:
        return "(base config)"
    data = yaml.safe_load(overlay.read_text()) or {}
    if isinstance(data.get("trainer"), dict):
        data["trainer"] = {k: v for k, v in data["trainer"].items() if k != "logger"} or None
    return ", ".join(f"{key}={value}" for key, value in _flatten(data) if value is not None) or "(no change)"


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Leaf `dotted.key` -> value; `init_args` levels dropped (`model.ar_weight`, not `model.init_args.ar_weight`)."""
    if isinstance(data, dict) and data:
        items = []
        for key, value in data.items():
            child = prefix if key == "init_args" else (f"{prefix}.{key}" if prefix else str(key))
            items += _flatten(value, child)
        return items
    return [(prefix, data)]


def run_all(args: AblateSettings) -> None:
    if not args.base:
        raise UserError("--base BASE.yaml is required to run ablations (or use --collect ROOT)")
    base = resolve_config(args.base)
    extra = args.fit_args
    runs = plan_runs(overlay_files(args.overlays), baseline=args.baseline)
    if args.count:
        print(len(runs))
        return
    root = Path(args.root)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise UserError(f"--index {args.index} out of range: {len(runs)} runs ({[n for n, _ in runs]})")
        runs = [runs[args.index]]
    failed = []
    for name, overlay in runs:
        argv = ["fit", *fit_args(base, name, overlay, root, extra)]
        print("cllm " + " ".join(argv), flush=True)
        if args.dry_run:
            continue
        write_logger_config(base, name, overlay, root)
        record = {"name": name, "base": base, "overlay": str(overlay) if overlay else None}
        record["delta"] = overlay_delta(overlay)
        started = time.time()
        if args.index is not None:
            # In this process, so SLURM's SIGUSR1 reaches Lightning (a child process would not get it).
            record["command"] = argv
            atomic_write_text(root / name / RECORD, json.dumps(record, indent=1))
            returncode: int | str | None = 1
            try:
                run_lightning(argv)
                returncode = 0
            except UserError:
                returncode = 2
                raise
            except SystemExit as exit_:
                returncode = exit_.code
                raise
            finally:
                record.update(returncode=returncode, seconds=round(time.time() - started, 1))
                atomic_write_text(root / name / RECORD, json.dumps(record, indent=1))
            continue
        returncode = subprocess.run([sys.executable, "-m", "cllm", *argv]).returncode
        record.update(command=argv, returncode=returncode, seconds=round(time.time() - started, 1))
        atomic_write_text(root / name / RECORD, json.dumps(record, indent=1))
        if returncode:
            failed.append(name)
    if failed:
        raise UserError(f"{len(failed)} of {len(runs)} runs failed: {failed} (see their output above)")


# --- Collecting ----------------------------------------------------------------------------------------------
def wandb_history(run_dir: Path) -> list[dict[str, float]]:
    """History rows of the W&B runs under `run_dir/wandb` (a requeued job has one folder per attempt)."""
    rows = []
    for folder in sorted(run_dir.glob("wandb/*run-*")):
        if folder.is_dir() and list(folder.glob("run-*.wandb")):
            for row in read_offline_run(folder).history:
                scalars = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not k.startswith("_")}
                if "trainer/global_step" in scalars:
                    scalars["step"] = scalars.pop("trainer/global_step")
                rows.append(scalars)
    return rows


def final_metrics(run_dir: Path) -> dict[str, float]:
    """Last logged value of every metric, plus `step` (the last step logged) and the step-0 accepted tokens."""
    rows = read_metrics_csv(run_dir) or wandb_history(run_dir)
    final: dict[str, float] = {}
    for row in rows:
        final.update(row)
    accepted = [row for row in rows if "val/accepted_tokens_per_step" in row]
    if accepted and accepted[0].get("step", 0) == 0:
        final["base/accepted_tokens_per_step"] = accepted[0]["val/accepted_tokens_per_step"]
    return final


def collect(root: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """One row per run folder under `root` (baseline first): name, overlay delta, final step and metrics."""
    if not root.is_dir():
        raise UserError(f"--collect {root}: no such folder")
    folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: (p.name != BASELINE, p.name))
    rows, keys = [], set()
    for folder in folders:
        record = json.loads((folder / RECORD).read_text()) if (folder / RECORD).is_file() else {}
        metrics = final_metrics(folder)
        if not metrics and not record:
            continue  # not a run folder
        keys |= set(metrics)
        status = "failed" if record.get("returncode") else ("ok" if metrics else "no metrics")
        rows.append({"run": folder.name, "change": record.get("delta", ""), "status": status, **metrics})
    if not keys:
        raise UserError(f"--collect {root}: no run folder with a metrics.csv or W&B run files")
    ordered = [k for k in ("base/accepted_tokens_per_step", *PREFERRED) if k in keys]
    ordered += sorted(k for k in keys if k.startswith("val/") and k not in ordered and k not in SKIPPED)
    ordered += sorted(k for k in keys if k.startswith("train/") and "loss" in k and k not in ordered)
    columns = ["run", "change", "status", "step", *ordered]
    return columns, rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.0f}" if value.is_integer() and abs(value) >= 1 else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")


def render_markdown(columns: list[str], rows: list[dict[str, Any]], root: Path) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"Collected from `{root}` by `python -m cllm ablate --collect {root}` on {stamp}. Final value of each metric;",
        "`base/accepted_tokens_per_step` is the model before training (step 0). Accepted tokens per step = generated",
        "tokens / decode forward passes (prefill excluded), averaged over prompts; greedy AR is exactly 1.0.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if c in ("run", "change", "status") else "---:" for c in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_csv(columns: list[str], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def write_report(output: Path, table: str, csv_text: str) -> None:
    """Write the table into `output` between the ablate markers (prose around them is kept), and the CSV beside it."""
    block = f"{BEGIN}\n{table}{END}"
    if output.is_file() and BEGIN in (text := output.read_text()) and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Ablations\n\n{block}\n"
    atomic_write_text(output, text)
    atomic_write_text(output.with_suffix(".csv"), csv_text)


def ablate(args: AblateSettings) -> None:
    """Collect the table (`--collect`) or plan/run the ablation runs."""
    if args.collect:
        root = Path(args.collect)
        columns, rows = collect(root)
        table = render_markdown(columns, rows, root)
        print(table, end="")
        if args.output:
            write_report(Path(args.output), table, render_csv(columns, rows))
        return
    unknown = [a for a in args.fit_args if a.startswith("-") and not a.startswith("--")]
    if unknown:
        raise UserError(f"unknown option(s) {unknown}; overrides for `cllm fit` look like --trainer.max_steps=10")
    run_all(args)


def main(argv: list[str]) -> None:
    own, fit = split_fit_args(list(argv))
    settings = parse_settings(AblateSettings, own, "cllm ablate", __doc__.splitlines()[0])
    settings.fit_args = [*settings.fit_args, *fit]
    ablate(settings)

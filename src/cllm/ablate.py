"""`python -m cllm ablate`: run ablation overlays on a base config, then collect their final metrics into a table.

    python -m cllm ablate --base tiny.yaml                        # baseline + every bundled configs/ablations/*.yaml
    python -m cllm ablate --base tiny.yaml   --overlays configs/ablations/n8.yaml --trainer.max_steps=50
    python -m cllm ablate --base tiny.yaml   --count              # how many runs (size of the SLURM array)
    python -m cllm ablate --base tiny.yaml   --index 3            # run number 3 only, in this process (SLURM array)
    python -m cllm ablate --collect runs/ablate --output docs/ablations.md   # also writes docs/ablations.csv
    python -m cllm ablate --recipe recipes/json-demo.yaml --overlays configs/ablations/n8.yaml   # recipe variants,
                                                                  # each `cllm run` end to end (fit + evaluate)

Unknown `--key=value` arguments (and all after a lone `--`) are passed to every `cllm fit`; `--config FILE` is a
YAML file of ablate's own options, as for every command.

Each run is `cllm fit --config BASE [--config OVERLAY] --trainer.default_root_dir=ROOT/NAME [overrides]`, NAME being
the overlay's file stem (`baseline` for the base alone). The collector reads each run folder's CSVLogger
`metrics.csv` files, or else its W&B run files (`wandb/*run-*/run-*.wandb`), and keeps the last value of every metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from cllm.ablate_collect import BASELINE, RECORD, collect, render_csv, render_markdown, write_report
from cllm.arguments import bundled_config_dir, parse_settings, resolve_config
from cllm.errors import UserError
from cllm.files import atomic_write_text
from cllm.lightning_cli import run_lightning

LOGGERS = "loggers.yaml"  # per run: the loggers of the base/overlay, writing into the run folder


@dataclass(kw_only=True)
class AblateSettings:
    """`cllm ablate`: run ablation overlays on a base config, or collect their final metrics into a table.

    Args:
        base: base config of every run (NAME.yaml: current folder first, then the bundled configs/).
        recipe: instead of --base: run every overlay as a variant of this recipe (`cllm run --recipe R --overlay O`:
            fit, export, evaluate against the base model; each report under ROOT/NAME/report).
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
    recipe: str | None = None
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


def recipe_args(recipe: str, name: str, overlay: Path | None, root: Path, extra: list[str]) -> list[str]:
    """Arguments of `cllm run` for one variant of a recipe (fit overrides `--KEY=VALUE` become `--override`)."""
    args = ["--recipe", recipe, "--name", name, "--work_dir", str(root)]
    args += ["--overlay", str(overlay)] if overlay else []
    return [*args, *(part for item in extra for part in ("--override", item.removeprefix("--")))]


def run_all(args: AblateSettings) -> None:
    if bool(args.base) == bool(args.recipe):
        raise UserError("give one of --base BASE.yaml or --recipe RECIPE.yaml to run ablations (or --collect ROOT)")
    base = resolve_config(args.base or args.recipe)
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
        if args.recipe:
            argv = ["run", *recipe_args(base, name, overlay, root, extra)]
        else:
            argv = ["fit", *fit_args(base, name, overlay, root, extra)]
        print("cllm " + " ".join(argv), flush=True)
        if args.dry_run:
            continue
        if not args.recipe:
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
                if args.recipe:
                    from cllm.recipe import main as run_recipe

                    run_recipe(argv[1:])
                else:
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

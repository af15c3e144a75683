"""`python -m cllm run --recipe recipes/NAME.yaml`: one experiment end to end, from its recipe file alone.

A recipe (`configs/recipes/`) is the citation of a reported figure: a `recipe:` block (the base config, the
overlays, the evaluation) and the fit settings of the experiment beside it (any `cllm fit` key):

    recipe:
      base: smollm2-135m.yaml
      overlays: [domains/json-extract.yaml, objectives/jacobi_forcing.yaml]
      evaluate: {prompts: [json-extract:test], limit: 32, max_new_tokens: 64, decoder: [jacobi, recycle]}
    trainer: {max_steps: 200}

Stages, in WORK_DIR/NAME/: (1) `cllm fit` (collecting the trajectories first when the folder is missing), its
progress lines shown here and everything in fit.log; run again, it resumes from the fit's last checkpoint (saved
at each validation) when the resolved fit settings are those it started with (fit/settings.yaml), and refuses
otherwise; (2) `cllm export` of the last checkpoint into model/;
(3) `cllm evaluate` of the trained model against the base model (`cllm.evaluate`: paired timing, training gain);
(4) results.json + results.md in --output (default WORK_DIR/NAME/report), with the recipe, command, validation
curve and stage times. `--overlay` runs a variant (NAME+STEM...); `--override KEY=VALUE` changes one fit setting.

An evaluation-only recipe times another recipe's model with other evaluation settings; it holds no fit settings of
its own (they, the base and the overlays are the named recipe's: one owner) and never fits:

    recipe:
      evaluates: recipes/json-one-block-long.yaml    # its model, runs/json-one-block-long/model, must be exported
      evaluate: {prompts: [json-extract:test], decoder: [jacobi, jacobi+compile, recycle], n_values: [8, 16, 32]}

Its report goes to WORK_DIR/NAME/report-STEM (NAME: the evaluated recipe's, STEM: this file's) unless --output says.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cllm.arguments import parse_settings, resolve_config
from cllm.errors import UserError
from cllm.evaluate import EvaluateSettings, check_settings, evaluate
from cllm.evaluate_report import markdown
from cllm.files import atomic_write_text, write_json
from cllm.records import block_size
from cllm.tracking import read_metrics_csv

PYTHON = [sys.executable, "-m", "cllm"]
PROGRESS = "--trainer.callbacks+=cllm.callbacks.progress.ProgressCallback"
RECIPE_KEYS = {"base", "overlays", "evaluate", "evaluates"}


@dataclass(kw_only=True)
class RunSettings:
    """`cllm run`: a recipe end to end (collect, fit, export, evaluate, report).

    Args:
        recipe: the recipe file: recipes/NAME.yaml (bundled) or a path.
        overlay: extra overlays, a variant of the recipe (repeatable; the run is named NAME+STEM).
        override: one fit setting, KEY=VALUE (repeatable), e.g. model.init_args.lr=1e-4.
        work_dir: runs write WORK_DIR/NAME/ (trajectories, fit, model, report).
        output: the report folder (default WORK_DIR/NAME/report; an evaluation-only recipe's WORK_DIR/NAME/report-STEM).
        name: the run's folder name (default: the recipe's file stem, +STEM of each --overlay).
        skip_fit: evaluate the model already exported in the work folder.
    """

    recipe: str
    overlay: list[str] = field(default_factory=list)
    override: list[str] = field(default_factory=list)
    work_dir: str = "runs"
    output: str | None = None
    name: str | None = None
    skip_fit: bool = False


def load_recipe(path: str, named_by: str | None = None) -> tuple[dict, dict]:
    """(the `recipe:` block, the fit settings) of a recipe file; unknown recipe keys and evaluation settings are
    refused naming the file and the key, before anything runs. `named_by`: the evaluation-only recipe naming it."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from err
    block = content.pop("recipe", None)
    if isinstance(block, dict) and "evaluates" in block:
        if named_by:
            raise UserError(f"{named_by}: recipe.evaluates names {path}, itself an evaluation-only recipe")
        return _evaluation_only(path, block, content)
    if not isinstance(block, dict) or "base" not in block or "evaluate" not in block:
        raise UserError(f"{path}: a recipe needs a `recipe:` block with `base` and `evaluate`")
    unknown = set(block) - RECIPE_KEYS
    if unknown:
        raise UserError(f"{path}: unknown key recipe.{sorted(unknown)[0]}; a recipe block holds {sorted(RECIPE_KEYS)}")
    return _checked_evaluation(path, block), content


def _evaluation_only(path: str, block: dict, content: dict) -> tuple[dict, dict]:
    """An evaluation-only recipe (`evaluates: OTHER`): OTHER's base, overlays and fit settings, this file's
    evaluation; it may hold nothing else (a fit setting here would not describe the model it times)."""
    extra = [f"recipe.{key}" for key in sorted(set(block) - {"evaluates", "evaluate"})] or sorted(content)
    if extra:
        raise UserError(
            f"{path}: an evaluation-only recipe (recipe.evaluates) holds only recipe.evaluate; {extra[0]} belongs "
            f"in {block['evaluates']}"
        )
    if not isinstance(block["evaluates"], str) or not isinstance(block.get("evaluate"), dict):
        raise UserError(f"{path}: recipe.evaluates names a recipe file and recipe.evaluate gives the settings")
    other, fit = load_recipe(resolve_config(block["evaluates"]), named_by=path)
    evaluation = {**block, "base": other["base"], "overlays": other.get("overlays", [])}
    return _checked_evaluation(path, evaluation), fit


def _checked_evaluation(path: str, block: dict) -> dict:
    """The recipe block, once every recipe.evaluate key is a `cllm evaluate` setting."""
    known = {f.name for f in dataclasses.fields(EvaluateSettings)} - {"model", "base", "output", "n"}
    for key in block["evaluate"]:
        if key not in known:
            raise UserError(f"{path}: unknown key recipe.evaluate.{key}; `cllm evaluate --help` lists them")
    return block


def fit_config(configs: list[str], fit_args: list[str]) -> dict:
    """The fit config as `cllm fit` resolves it (`--print_config`): the one source of the base model and n."""
    command = [*PYTHON, "fit", *(f"--config={c}" for c in configs), *fit_args, "--print_config"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise UserError(f"the recipe's fit config does not resolve: {last[0]}")
    return yaml.safe_load(done.stdout)


def run_stage(name: str, command: list[str], log: Path, shown: str | None = None, append: bool = False) -> float:
    """Run one stage with its output in `log` (after what it holds, with `append`); lines starting with `shown` are
    printed here too."""
    print(f"== {name}: {' '.join(command)}\n   (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "a" if append else "w") as handle:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in child.stdout:
            handle.write(line)
            if shown and line.startswith(shown):
                print("   " + line.rstrip(), flush=True)
        code = child.wait()
    if code != 0:
        raise UserError(f"stage {name} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def latest_checkpoint(root: Path) -> Path:
    found = sorted(root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"no checkpoint under {root}")
    return found[-1]


def validation_curve(fit_root: Path) -> list[tuple[int, float]]:
    """(step, val/accepted_tokens_per_step) from the fit's CSV logs; a step logged again by a resumed fit (it
    restarts at its last checkpoint) keeps the newest value."""
    key = "val/accepted_tokens_per_step"
    return sorted({int(row["step"]): row[key] for row in read_metrics_csv(fit_root) if key in row}.items())


def resume_checkpoint(fit_root: Path, config: dict, name: str) -> Path | None:
    """The checkpoint a rerun of the recipe resumes from (None: a fresh fit), after writing the settings a fresh
    fit starts with to fit/settings.yaml. A last checkpoint from other settings (or from before settings were
    kept) is refused, naming the first setting that differs: resuming would mix two experiments. A fit folder
    without a checkpoint (stopped before its first validation) is moved aside to fit.stopped-TIME, not mixed in."""
    settings_file, last = fit_root / "settings.yaml", fit_root / "checkpoints" / "last.ckpt"
    if last.exists():
        kept = yaml.safe_load(settings_file.read_text()) if settings_file.exists() else None
        if kept != config:
            where = f"{first_difference(kept, config)} differs" if kept is not None else f"no {settings_file}"
            raise UserError(
                f"{fit_root} holds the checkpoints of a fit with other settings ({where}); remove it to start "
                f"afresh, or run this variant under another --name than {name}"
            )
        return last
    if any(fit_root.rglob("*.ckpt")):
        raise UserError(f"{fit_root} holds checkpoints but no checkpoints/last.ckpt: resume with cllm fit --ckpt_path")
    if fit_root.exists():
        aside = fit_root.with_name(f"fit.stopped-{datetime.datetime.now():%Y%m%d-%H%M%S}")
        fit_root.rename(aside)
        print(f"   {fit_root} had no checkpoint (stopped before its first validation): moved to {aside}", flush=True)
    fit_root.mkdir(parents=True)
    atomic_write_text(settings_file, yaml.safe_dump(config, sort_keys=False))
    return None


def first_difference(old, new, path: str = "") -> str:
    """The dotted key of the first place two resolved configs differ (`path` or the root when they are leaves)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            if key not in old or key not in new or old[key] != new[key]:
                return first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return path or "the config"


def run(settings: RunSettings, argv: list[str] | None = None) -> dict:
    """Run the recipe (see the module docstring); return the results written to the report folder."""
    recipe = resolve_config(settings.recipe)
    block, fit_settings = load_recipe(recipe)
    for item in settings.override:
        if "=" not in item:
            raise UserError(f"--override {item!r}: give KEY=VALUE, e.g. model.init_args.lr=1e-4")
    evaluates = block.get("evaluates")  # an evaluation-only recipe: the named recipe's work folder and model
    stem = Path(evaluates or recipe).stem
    name = settings.name or "+".join([stem, *(Path(o).stem for o in settings.overlay)])
    work = Path(settings.work_dir) / name
    report = f"report-{Path(recipe).stem}" if evaluates else "report"
    output = Path(settings.output) if settings.output else work / report
    base_evaluation = EvaluateSettings(model="(trained)", **block["evaluate"])
    check_settings(base_evaluation)  # a bad evaluation setting fails now, not after the fit
    configs = [
        resolve_config(block["base"]),
        *(resolve_config(o) for o in [*block.get("overlays", []), *settings.overlay]),
    ]
    exported, timings = work / "model", {}
    if evaluates:  # refused before anything is written: it fits nothing, so it needs the model and takes no override
        if settings.override:
            raise UserError(f"--override {settings.override[0]}: {recipe} only evaluates; override the fit it names")
        if not exported.is_dir():
            raise UserError(f"{recipe}: no exported model in {exported}; run `cllm run --recipe {evaluates}` first")
    # the fit settings beside the model stay those of the fit that made it: an evaluation keeps its copy in the report
    fit_file = (output if evaluates else work) / "recipe-fit.yaml"
    fit_text = yaml.safe_dump(fit_settings, sort_keys=False)
    fit_args = [
        f"--trainer.default_root_dir={work / 'fit'}",
        f"--trainer.logger.init_args.save_dir={work / 'fit'}",
        f"--data.init_args.path={work / 'trajectories'}",
        *(f"--{item}" for item in settings.override),
    ]
    with tempfile.TemporaryDirectory() as scratch:  # resolved from a scratch copy: nothing is written before checks
        (Path(scratch) / fit_file.name).write_text(fit_text)
        config = fit_config([*configs, str(Path(scratch) / fit_file.name)], fit_args)
    if "max_new_tokens" not in block["evaluate"]:  # one owner: the trajectories' length, unless the recipe says
        base_evaluation.max_new_tokens = config["data"]["init_args"]["max_new_tokens"]
    base_model = config["model"]["init_args"]["model"]
    n, _ = block_size(config["data"]["init_args"]["path"], config["data"]["init_args"].get("n"))
    fitting = not settings.skip_fit and not evaluates
    resume = resume_checkpoint(work / "fit", config, name) if fitting else None
    fit_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fit_file, fit_text)
    configs.append(str(fit_file))
    if fitting:
        fit = [*PYTHON, "fit", *(f"--config={c}" for c in configs), *fit_args, PROGRESS]
        if resume:
            print(f"== fit resumes from {resume} (the same settings: {work / 'fit' / 'settings.yaml'})", flush=True)
            fit.append(f"--ckpt_path={resume}")
        timings["fit"] = run_stage("fit", fit, work / "fit.log", shown="[progress]", append=resume is not None)
        export = [*PYTHON, "export", "--ckpt", str(latest_checkpoint(work / "fit")), "--output", str(exported)]
        timings["export"] = run_stage("export", export, work / "export.log")
    elif not exported.is_dir():
        raise UserError(f"--skip_fit: no exported model in {exported}; run the recipe once without it")
    start = time.perf_counter()
    evaluation = dataclasses.replace(base_evaluation, model=str(exported), base=base_model, n=n, output=str(output))
    results = evaluate(evaluation, [f"--recipe {settings.recipe}"])
    timings["evaluate"] = time.perf_counter() - start
    results["command"] = " ".join(["python -m cllm run", *(argv or [f"--recipe {settings.recipe}"])])
    results["recipe"] = {
        "file": str(Path(settings.recipe)),
        **({"evaluates": evaluates} if evaluates else {}),
        "name": name,
        "overlays": settings.overlay,
        "overrides": settings.override,
        "base_model": base_model,
        "n": n,
        "date": datetime.date.today().isoformat(),
        "timings": timings,  # a resumed fit's time is its last attempt's
        **({"fit_resumed_from": str(resume)} if resume else {}),
        "validation_curve": validation_curve(work / "fit"),
    }
    write_json(output / "results.json", results)
    (output / "results.md").write_text(markdown(results))
    print(f"wrote {output}/results.json and results.md")
    return results


def main(argv: list[str]) -> None:
    run(parse_settings(RunSettings, argv, "cllm run", __doc__), argv)

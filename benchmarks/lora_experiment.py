"""Can low-rank adapters learn consistency? Accepted tokens per Jacobi step after the same number of steps, full
fine-tuning against LoRA ranks, on json-extract (recipes/json-demo-jf.yaml and recipes/json-extract-lora.yaml).

    OMP_NUM_THREADS=1 python benchmarks/lora_experiment.py --data runs/demo/json-demo/trajectories \\
        --full runs/demo/json-demo/fit --ranks 32 128 --steps 40
                                               # writes docs/results/lora/experiment.json and experiment.md

Each rank trains the json-extract-lora recipe's fit (its base config, overlays and settings; `lora.rank` set, alpha = 2
rank) on the trajectories in `--data` and is stopped after its validation at `--steps`: training is deterministic and
the schedule is the recipe's (the cosine over its 200 steps), so the figures at that step are those of the whole run's;
a rerun reuses the runs already in `--work_dir`. `--full` is the fit folder of the json-demo recipe (the full fine-tune,
same data and schedule; `cllm run --recipe recipes/json-demo-jf.yaml`), read at the same step; without it
the full fine-tune is trained here too. Figures are the AcceptedTokensCallback's on the held-out json-extract validation
prompts: mean accepted tokens per Jacobi step (before training: the base model), agreement with the base model's greedy
output and the rate of degenerate (repeating) outputs; gain = trained - base, and each rank's share of the full
fine-tune's gain. Then each variant's checkpoint at `--steps` is exported (merged) and evaluated on the json-extract
test split with `cllm evaluate` (plain Jacobi: tokens/step, valid/exact/fields, degenerate rate), beside the base
model's: the comparison the LoRA issue asks for, on prompts no variant chose anything on.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cllm.arguments import parse_settings, resolve_config
from cllm.files import atomic_write_text, write_json
from cllm.recipe import load_recipe
from cllm.tracking import read_metrics_csv

KEYS = ("val/accepted_tokens_per_step", "val/base_agreement", "val/degenerate_rate")


@dataclass(kw_only=True)
class LoraExperimentSettings:
    """`benchmarks/lora_experiment.py`: tokens/step of full fine-tuning vs LoRA ranks after the same steps.

    Args:
        data: the json-extract trajectories (collected by the json-demo recipe; a copy is fine).
        full: the fit folder of the json-demo recipe's full fine-tune (None: train it here too).
        recipe: the LoRA recipe whose fit each rank trains.
        ranks: LoRA ranks (alpha = 2 rank).
        steps: compare after this many steps (a validation step of the recipe).
        work_dir: where the runs go (WORK_DIR/rank-R/).
        output: the JSON to write (a markdown table beside it, .md).
        test_prompts: the held-out set every variant and the base are evaluated on ('' to skip).
        test_limit: its first K prompts.
        max_new_tokens: the test generation budget (the json domain's).
        base_model: the recipe's base model, evaluated on the test prompts as the untrained reference.
    """

    data: str
    full: str | None = None
    recipe: str = "recipes/json-extract-lora.yaml"
    ranks: list[int] = field(default_factory=lambda: [32, 128])
    steps: int = 40
    work_dir: str = "runs/lora-experiment"
    output: str = "docs/results/lora/experiment.json"
    test_prompts: str = "json-extract:test"
    test_limit: int = 32
    max_new_tokens: int = 64
    base_model: str = "smollm2-135m"


def at_step(fit_root: Path, step: int) -> dict | None:
    """The validation figures of a fit at `step` and before training (step 0), None until both are logged."""
    rows = [row for row in read_metrics_csv(fit_root) if KEYS[0] in row]
    by_step = {int(row["step"]): {key: row.get(key) for key in KEYS} for row in rows}
    # the validation after `step` optimizer steps is logged at step - 1 (the base model's, before any, at 0)
    if 0 not in by_step or step - 1 not in by_step:
        return None
    return {"base": by_step[0], "trained": by_step[step - 1]}


def checkpoint_at(fit_root: Path, step: int) -> Path | None:
    return next(iter(sorted((fit_root / "checkpoints").glob(f"*step={step}.ckpt"))), None)


def train_until(command: list[str], fit_root: Path, step: int, log: Path) -> tuple[dict, float]:
    """Run a fit until its validation at `step` is logged and its checkpoint there written, then stop it;
    (its figures, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        while (figures := at_step(fit_root, step)) is None or checkpoint_at(fit_root, step) is None:
            if child.poll() is not None:
                raise SystemExit(f"the fit ended (exit {child.returncode}) before step {step}; see {log}")
            time.sleep(10)
        child.terminate()
        child.wait()
    return figures, time.perf_counter() - start


def run_quietly(command: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        if subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"{' '.join(command[1:4])} failed; see {log}")


def test_figures(settings: LoraExperimentSettings, model: str, out: Path) -> dict:
    """Plain-Jacobi tokens/step, quality and degenerate rate of `model` on the test prompts (`cllm evaluate`, one
    prompt timed: the figures here are not speed)."""
    if not (out / "results.json").is_file():
        command = [sys.executable, "-m", "cllm", "evaluate", "--model", model, "--prompts", settings.test_prompts]
        command += ["--limit", str(settings.test_limit), "--max_new_tokens", str(settings.max_new_tokens)]
        command += ["--decoder", "jacobi", "--dtypes", "auto", "--warmup", "1", "--timed", "1", "--repeats", "1"]
        out.parent.mkdir(parents=True, exist_ok=True)  # the base's folder is not a fit's
        run_quietly([*command, "--output", str(out)], out.parent / "test-eval.log")
    report = json.loads((out / "results.json").read_text())
    jacobi = report["models"]["cllm"][settings.test_prompts.split(":")[0]]["decoders"]["jacobi"]
    return {"tokens_per_step": jacobi["tokens_per_step"], "degenerate_rate": jacobi["degenerate_rate"]} | {
        **jacobi["quality"],
        "report": str(out),
    }


def test_split(settings: LoraExperimentSettings, rows: dict, work: Path) -> dict:
    """Each variant's checkpoint at `--steps`, exported merged, and the base model on the test prompts."""
    figures = {"base": test_figures(settings, settings.base_model, work / "base" / "test-eval")}
    for name, row in rows.items():
        root = Path(row.get("source") or work / name)
        ckpt = checkpoint_at(root, settings.steps)
        if ckpt is None:
            raise SystemExit(f"{root} holds no checkpoint at step {settings.steps}; leave out --full to train it here")
        model = work / name / f"model-step{settings.steps}"
        if not (model / "config.json").is_file():
            export = [sys.executable, "-m", "cllm", "export", "--ckpt", str(ckpt), "--output", str(model)]
            run_quietly([*export, "--overwrite", "true"], work / name / "export.log")
        figures[name] = test_figures(settings, str(model), work / name / "test-eval")
        print(name, "test", figures[name], flush=True)
    return figures


def main(argv: list[str]) -> None:
    settings = parse_settings(LoraExperimentSettings, argv, "benchmarks/lora_experiment.py", __doc__.splitlines()[0])
    block, fit = load_recipe(resolve_config(settings.recipe))
    work = Path(settings.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe-fit.yaml").write_text(yaml.safe_dump(fit, sort_keys=False))
    configs = [resolve_config(c) for c in [block["base"], *block["overlays"]]] + [str(work / "recipe-fit.yaml")]
    variants = {f"lora-r{rank}": f"{{rank: {rank}, alpha: {2.0 * rank}}}" for rank in settings.ranks}
    if settings.full is None:  # the json-demo recipe's settings: the LoRA recipe's without lora, at its lr
        _, demo = load_recipe(resolve_config("recipes/json-demo.yaml"))
        variants = {"full": None, **variants}
        (work / "full-fit.yaml").write_text(yaml.safe_dump(demo, sort_keys=False))
    rows = {}
    for name, lora in variants.items():
        root = work / name
        own = [str(work / "full-fit.yaml")] if lora is None else []
        command = [sys.executable, "-m", "cllm", "fit", *(f"--config={c}" for c in configs + own)]
        command += [f"--data.init_args.path={settings.data}", f"--trainer.default_root_dir={root}"]
        command += [f"--trainer.logger.init_args.save_dir={root}"]
        command += ["--model.init_args.lora=null"] if lora is None else [f"--model.init_args.lora={lora}"]
        rows[name] = {"command": " ".join(command[1:])}
        if at_step(root, settings.steps) is None or checkpoint_at(root, settings.steps) is None:  # else: done before
            _, rows[name]["seconds"] = train_until(command, root, settings.steps, work / f"{name}.log")
        rows[name]["figures"] = at_step(root, settings.steps)
        print(name, rows[name]["figures"], flush=True)
    if settings.full is not None:
        rows = {"full": {"figures": at_step(Path(settings.full), settings.steps), "source": settings.full}, **rows}
        if rows["full"]["figures"] is None:
            raise SystemExit(
                f"{settings.full} has no validation at step {settings.steps} (and step 0) yet; rerun later"
            )
    gain = {name: row["figures"]["trained"][KEYS[0]] - row["figures"]["base"][KEYS[0]] for name, row in rows.items()}
    for name, row in rows.items():
        row["gain"], row["share_of_full_gain"] = gain[name], gain[name] / gain["full"] if gain["full"] else None
    test = test_split(settings, rows, work) if settings.test_prompts else {}
    for name, row in rows.items():
        if name in test:
            gained = test[name]["tokens_per_step"] - test["base"]["tokens_per_step"]
            full = test["full"]["tokens_per_step"] - test["base"]["tokens_per_step"]
            row["test"] = {**test[name], "gain": gained, "share_of_full_gain": gained / full if full else None}
    report = {"settings": dataclasses.asdict(settings), "recipe_fit": fit, "rows": rows, "test_base": test.get("base")}
    write_json(settings.output, report)
    lines = [
        f"| variant | tokens/step at step 0 | at step {settings.steps} | gain | share of full's gain "
        "| base agreement | degenerate rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        base, trained = row["figures"]["base"], row["figures"]["trained"]
        lines.append(
            f"| {name} | {base[KEYS[0]]:.3f} | {trained[KEYS[0]]:.3f} | {row['gain']:+.3f} "
            f"| {row['share_of_full_gain']:.2f} | {trained[KEYS[1]]:.3f} | {trained[KEYS[2]]:.3f} |"
        )
    if test:
        base = test["base"]
        lines += [
            "",
            f"{settings.test_prompts} (first {settings.test_limit}), plain Jacobi, the checkpoints at step "
            f"{settings.steps} exported merged; base model: {base['tokens_per_step']:.3f} tokens/step, "
            + ", ".join(f"{key} {base[key]:.3f}" for key in ("valid", "exact", "fields")),
            "",
            "| variant | test tokens/step | gain | share of full's gain | valid | exact | fields | degenerate rate |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in rows.items():
            t = row["test"]
            lines.append(
                f"| {name} | {t['tokens_per_step']:.3f} | {t['gain']:+.3f} | {t['share_of_full_gain']:.2f} "
                f"| {t['valid']:.3f} | {t['exact']:.3f} | {t['fields']:.3f} | {t['degenerate_rate']:.3f} |"
            )
    atomic_write_text(Path(settings.output.removesuffix(".json") + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

"""Can low-rank adapters learn consistency? Accepted tokens per Jacobi step after the same number of steps, full
fine-tuning against LoRA ranks, on json-extract (recipes/json-demo.yaml and recipes/json-extract-lora.yaml).

    OMP_NUM_THREADS=1 python benchmarks/lora_experiment.py --data runs/demo/json-demo/trajectories \\
        --full runs/demo/json-demo/fit --ranks 32 128 --steps 40
                                               # writes docs/results/lora/experiment.json and experiment.md

Each rank trains the json-extract-lora recipe's fit (its base config, overlays and settings; `lora.rank` set, alpha = 2
rank) on the trajectories in `--data` and is stopped after its validation at `--steps`: training is deterministic and
the schedule is the recipe's (the cosine over its 200 steps), so the figures at that step are those of the whole run's;
a rerun reuses the runs already in `--work_dir`. `--full` is the fit folder of the json-demo recipe (the full fine-tune,
same data and schedule; `cllm run --recipe recipes/json-demo.yaml` or `make demo`), read at the same step; without it
the full fine-tune is trained here too. Figures are the AcceptedTokensCallback's on the held-out json-extract validation
prompts: mean accepted tokens per Jacobi step (before training: the base model), agreement with the base model's greedy
output and the rate of degenerate (repeating) outputs; gain = trained - base, and each rank's share of the full
fine-tune's gain.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cllm.arguments import parse_settings, resolve_config
from cllm.files import write_json
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
    """

    data: str
    full: str | None = None
    recipe: str = "recipes/json-extract-lora.yaml"
    ranks: list[int] = field(default_factory=lambda: [32, 128])
    steps: int = 40
    work_dir: str = "runs/lora-experiment"
    output: str = "docs/results/lora/experiment.json"


def at_step(fit_root: Path, step: int) -> dict | None:
    """The validation figures of a fit at `step` and before training (step 0), None until both are logged."""
    rows = [row for row in read_metrics_csv(fit_root) if KEYS[0] in row]
    by_step = {int(row["step"]): {key: row.get(key) for key in KEYS} for row in rows}
    # the validation after `step` optimizer steps is logged at step - 1 (the base model's, before any, at 0)
    if 0 not in by_step or step - 1 not in by_step:
        return None
    return {"base": by_step[0], "trained": by_step[step - 1]}


def train_until(command: list[str], fit_root: Path, step: int, log: Path) -> tuple[dict, float]:
    """Run a fit until its validation at `step` is logged, then stop it; (its figures, seconds)."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        while (figures := at_step(fit_root, step)) is None:
            if child.poll() is not None:
                raise SystemExit(f"the fit ended (exit {child.returncode}) before step {step}; see {log}")
            time.sleep(10)
        child.terminate()
        child.wait()
    return figures, time.perf_counter() - start


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
        if (figures := at_step(root, settings.steps)) is None:  # else trained by an earlier invocation
            figures, rows[name]["seconds"] = train_until(command, root, settings.steps, work / f"{name}.log")
        rows[name]["figures"] = figures
        print(name, figures, flush=True)
    if settings.full is not None:
        rows = {"full": {"figures": at_step(Path(settings.full), settings.steps), "source": settings.full}, **rows}
        if rows["full"]["figures"] is None:
            raise SystemExit(
                f"{settings.full} has no validation at step {settings.steps} (and step 0) yet; rerun later"
            )
    gain = {name: row["figures"]["trained"][KEYS[0]] - row["figures"]["base"][KEYS[0]] for name, row in rows.items()}
    for name, row in rows.items():
        row["gain"], row["share_of_full_gain"] = gain[name], gain[name] / gain["full"] if gain["full"] else None
    report = {"settings": dataclasses.asdict(settings), "recipe_fit": fit, "rows": rows}
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
    Path(settings.output.removesuffix(".json") + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])

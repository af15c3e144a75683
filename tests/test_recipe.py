"""Recipes and the runner: every recipe parses (with every base), bad recipes are one line, a tiny recipe runs end
to end (fit with progress lines, export, evaluate vs the base) and an evaluation-only recipe times its model again,
and `ablate --recipe` plans its variants."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cllm.arguments import bundled_config_dir
from cllm.cli import main
from cllm.errors import UserError
from cllm.evaluate import EvaluateSettings, check_settings
from cllm.recipe import load_recipe, resume_checkpoint, validation_curve

RECIPES = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().glob("recipes/*.yaml"))
BASES = ["tiny.yaml", "smollm2-135m.yaml", "llama7b.yaml"]


def print_config(capsys, configs: list[str]) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(["fit", *(part for c in configs for part in ("--config", c)), "--print_config"])
    assert stop.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_the_cited_recipes_are_bundled():
    assert {"recipes/json-demo.yaml", "recipes/json-jf-long.yaml", "recipes/broad-jf.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_names_its_figure_and_its_evaluation_is_valid(recipe):
    path = bundled_config_dir() / recipe
    block, _ = load_recipe(str(path))
    check_settings(EvaluateSettings(model="x", **block["evaluate"]))
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("python -m cllm run --recipe " + recipe in line for line in header), "the header gives its command"


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_prints_its_config_with_every_base(recipe, base, tmp_path, capsys):
    block, fit = load_recipe(str(bundled_config_dir() / recipe))
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(fit))
    parsed = print_config(capsys, [base, *block["overlays"], str(tmp_path / "fit.yaml")])
    assert parsed["trainer"]["max_steps"] == fit["trainer"]["max_steps"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("trainer: {max_steps: 2}\n", "needs a `recipe:` block"),
        ("recipe: {base: tiny.yaml, evaluate: {}, seeds: 3}\n", "unknown key recipe.seeds"),
        ("recipe: {base: tiny.yaml, evaluate: {prompts: [p], repeat: 2}}\n", "unknown key recipe.evaluate.repeat"),
        ("recipe: {base: tiny.yaml, evaluate: {prompts: [p], repeats: 0}}\n", "--repeats must be >= 1"),
        ("recipe: [1\n", "not valid YAML"),
        (
            "recipe: {evaluates: recipes/json-demo.yaml, evaluate: {prompts: [p]}}\ntrainer: {max_steps: 2}\n",
            "holds only recipe.evaluate; trainer belongs in recipes/json-demo.yaml",
        ),
        (
            "recipe: {evaluates: recipes/json-demo.yaml, base: tiny.yaml, evaluate: {prompts: [p]}}\n",
            "recipe.base belongs in recipes/json-demo.yaml",
        ),
        (
            "recipe: {evaluates: recipes/json-one-block-long-decoders.yaml, evaluate: {prompts: [p]}}\n",
            "itself an evaluation-only recipe",
        ),
        (
            "recipe: {evaluates: recipes/json-demo.yaml, evaluate: {prompts: [p], repeat: 2}}\n",
            "unknown key recipe.evaluate.repeat",
        ),
        ("recipe: {evaluates: recipes/json-demo.yaml, evaluate: {prompts: [p]}}\n", "no exported model in"),
    ],
)
def test_a_bad_recipe_is_one_line_before_anything_runs(content, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(content)
    with pytest.raises(SystemExit) as stop:
        main(["run", "--recipe", str(tmp_path / "bad.yaml"), "--work_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()  # nothing written


def tiny_recipe(tmp_path: Path) -> Path:
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"e{i}", "prompt": f"y{i} = {i} -"}) + "\n" for i in range(4)))
    recipe = {
        "recipe": {
            "base": "tiny.yaml",
            "overlays": ["objectives/jacobi_forcing.yaml"],
            "evaluate": {
                "prompts": [str(prompts)],
                "max_new_tokens": 8,
                "dtypes": ["float32"],
                "compile": False,
                "decoder": ["jacobi", "recycle"],
                "repeats": 1,
                "warmup": 1,
            },
        },
        "trainer": {"max_steps": 2, "val_check_interval": 2},
    }
    path = tmp_path / "tiny-recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.slow
def test_a_tiny_recipe_runs_end_to_end_with_progress_in_the_terminal(tmp_path):
    recipe = tiny_recipe(tmp_path)
    command = [sys.executable, "-m", "cllm", "run", "--recipe", str(recipe), "--work_dir", str(tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[progress] step 2/2" in done.stdout  # the fit's progress reaches the terminal, not only fit.log
    report = json.loads((tmp_path / "runs" / "tiny-recipe" / "report" / "results.json").read_text())
    assert report["recipe"]["base_model"] == "tiny" and report["recipe"]["n"] == 4
    assert len(report["recipe"]["validation_curve"]) == 2  # the base model (step 0), then after step 2
    assert set(report["models"]) == {"cllm", "base"} and "eval" in report["training_gain"]
    assert report["command"].startswith("python -m cllm run --recipe")

    # an evaluation-only recipe times that model again, with other settings, without fitting
    again = tmp_path / "tiny-again.yaml"
    evaluation = {**yaml.safe_load(recipe.read_text())["recipe"]["evaluate"], "decoder": ["jacobi"]}
    again.write_text(yaml.safe_dump({"recipe": {"evaluates": str(recipe), "evaluate": evaluation}}))
    command = [sys.executable, "-m", "cllm", "run", "--recipe", str(again), "--work_dir", str(tmp_path / "runs")]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== fit" not in done.stdout
    folder = tmp_path / "runs" / "tiny-recipe" / "report-tiny-again"
    report = json.loads((folder / "results.json").read_text())
    assert report["recipe"]["evaluates"] == str(recipe) and "fit" not in report["recipe"]["timings"]
    assert report["recipe"]["n"] == 4 and set(report["models"]) == {"cllm", "base"}
    assert yaml.safe_load((folder / "recipe-fit.yaml").read_text())["trainer"]["max_steps"] == 2


CRASH_ONCE = """
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class CrashOnce(Callback):
    \"\"\"Fails the fit as step 3 begins, once (a marker beside this file remembers).\"\"\"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        marker = Path(__file__).with_name("crashed")
        if trainer.global_step == 3 and not marker.exists():
            marker.write_text("1")
            raise RuntimeError("planted crash at step 3")
"""


@pytest.mark.slow
def test_a_recipe_run_again_resumes_its_fit_from_the_last_checkpoint(tmp_path):
    """A fit killed after its step-2 checkpoint resumes there on the rerun (steps 3-4 only, one curve);
    a rerun with another setting is refused in one line, and nothing of the run is touched."""
    recipe = tiny_recipe(tmp_path)
    content = yaml.safe_load(recipe.read_text())
    content["trainer"] = {"max_steps": 4, "val_check_interval": 2}
    recipe.write_text(yaml.safe_dump(content))
    (tmp_path / "crash_once.py").write_text(CRASH_ONCE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "cllm", "run", "--recipe", str(recipe), "--work_dir", str(tmp_path / "runs")]
    command += ["--override", "trainer.callbacks+=crash_once.CrashOnce"]
    first = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path, env=env)
    assert first.returncode == 2 and "stage fit failed" in first.stderr, first.stderr[-3000:]
    fit = tmp_path / "runs" / "tiny-recipe" / "fit"
    assert (fit / "checkpoints" / "last.ckpt").exists() and "planted crash" in (fit.parent / "fit.log").read_text()

    again = subprocess.run(command, capture_output=True, text=True, check=False, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fit resumes from" in again.stdout and "[progress] step 4/4" in again.stdout
    assert "[progress] step 1/4" not in again.stdout  # steps 1-2 were not trained again
    log = (fit.parent / "fit.log").read_text()
    assert "planted crash" in log and "Restoring" in log  # the first attempt's log kept, the second after it
    report = json.loads((fit.parent / "report" / "results.json").read_text())
    assert [step for step, _ in report["recipe"]["validation_curve"]] == [0, 1, 3]  # Lightning logs step - 1
    assert report["recipe"]["fit_resumed_from"] == str(fit / "checkpoints" / "last.ckpt")

    other = subprocess.run([*command, "--override", "model.init_args.lr=0.5"], capture_output=True, text=True,
                           check=False, cwd=tmp_path, env=env)  # fmt: skip
    assert other.returncode == 2 and "model.init_args.lr differs" in other.stderr, other.stderr[-3000:]
    assert len(other.stderr.strip().splitlines()) == 1
    assert yaml.safe_load((fit.parent / "recipe-fit.yaml").read_text())["trainer"]["max_steps"] == 4


def test_resume_checkpoint_starts_fresh_resumes_only_the_same_settings_and_moves_a_stopped_fit_aside(tmp_path):
    fit = tmp_path / "run" / "fit"
    config = {"model": {"init_args": {"lr": 1e-4}}, "trainer": {"max_steps": 4}}
    assert resume_checkpoint(fit, config, "run") is None  # fresh: the settings it starts with are kept
    assert yaml.safe_load((fit / "settings.yaml").read_text()) == config
    assert resume_checkpoint(fit, config, "run") is None  # stopped before any checkpoint: moved aside
    fit_folder, aside = sorted(p.name for p in fit.parent.iterdir())
    assert fit_folder == "fit" and aside.startswith("fit.stopped-") and (fit / "settings.yaml").exists()
    (fit / "checkpoints").mkdir()
    (fit / "checkpoints" / "last.ckpt").write_text("")
    assert resume_checkpoint(fit, config, "run") == fit / "checkpoints" / "last.ckpt"
    changed = {**config, "trainer": {"max_steps": 8}}
    with pytest.raises(UserError, match=r"trainer\.max_steps differs.*another --name than run"):
        resume_checkpoint(fit, changed, "run")
    added = {**config, "seed_everything": 1}
    with pytest.raises(UserError, match="seed_everything differs"):
        resume_checkpoint(fit, added, "run")
    (fit / "settings.yaml").unlink()  # a fit from before settings were kept
    with pytest.raises(UserError, match="no .*settings.yaml"):
        resume_checkpoint(fit, config, "run")


def test_validation_curve_keeps_the_newest_value_of_a_step_logged_again(tmp_path):
    key = "val/accepted_tokens_per_step"
    for version, rows in ((0, [(0, 1.0), (2, 1.5), (4, 1.7)]), (1, [(4, 1.8), (6, 2.0)])):
        folder = tmp_path / "logs" / f"version_{version}"
        folder.mkdir(parents=True)
        lines = ["step,train/loss," + key] + [f"{step},,{value}" for step, value in rows] + ["5,0.3,"]
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
        os.utime(folder / "metrics.csv", (version, version))  # oldest first, as written
    assert validation_curve(tmp_path) == [(0, 1.0), (2, 1.5), (4, 1.8), (6, 2.0)]


def test_ablate_runs_the_variants_of_a_recipe(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    argv = ["ablate", "--recipe", str(recipe), "--overlays", str(bundled_config_dir() / "ablations/n8.yaml")]
    main([*argv, "--root", str(tmp_path / "r"), "--dry_run", "--trainer.max_steps=1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"cllm run --recipe {recipe} --name baseline --work_dir {tmp_path / 'r'}")
    assert "--overlay" in out[1] and out[1].endswith("--override trainer.max_steps=1") and "--name n8" in out[1]


def test_an_evaluation_only_recipe_takes_no_fit_override(tmp_path, capsys):
    recipe = tmp_path / "again.yaml"
    recipe.write_text("recipe: {evaluates: recipes/json-demo.yaml, evaluate: {prompts: [p]}}\n")
    argv = ["run", "--recipe", str(recipe), "--work_dir", str(tmp_path / "runs"), "--override", "trainer.max_steps=3"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "only evaluates" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()

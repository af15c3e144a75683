"""Recipes and the runner: every recipe parses (with every base), bad recipes are one line, a tiny recipe runs end
to end (fit with progress lines, export, evaluate vs the base) and an evaluation-only recipe times its model again,
and `ablate --recipe` plans its variants."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cllm.arguments import bundled_config_dir
from cllm.cli import main
from cllm.evaluate import EvaluateSettings, check_settings
from cllm.recipe import load_recipe

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

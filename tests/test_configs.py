"""Every bundled config (and the base config + each ablation overlay) parses with the real `cllm fit` parser."""

from __future__ import annotations

import logging
import sys

import pytest
import yaml

from cllm.arguments import bundled_config_dir
from cllm.cli import main

CONFIGS = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().glob("*.yaml"))
OVERLAYS = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().glob("ablations/*.yaml"))
OBJECTIVES = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().glob("objectives/*.yaml"))
DOMAINS = sorted(str(p.relative_to(bundled_config_dir())) for p in bundled_config_dir().glob("domains/*.yaml"))
BASES = ["tiny.yaml", "smollm2-135m.yaml", "llama7b.yaml"]


def print_config(capsys, *configs: str) -> dict:
    argv = ["fit"]
    for config in configs:
        argv += ["--config", config]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_expected_configs_are_bundled():
    assert {"tiny.yaml", "smollm2-135m.yaml", "llama7b.yaml"} <= set(CONFIGS)
    expected = {"no_ar", "no_consistency", "local", "n8", "n32", "reverse_kl", "soft_ce", "ar_weight1"}
    assert {f"ablations/{name}.yaml" for name in expected} <= set(OVERLAYS)


@pytest.mark.parametrize("config", CONFIGS)
def test_bundled_config_parses(config, capsys):
    parsed = print_config(capsys, config)
    assert parsed["model"]["class_path"] == "cllm.module.CLLMModule"
    assert parsed["data"]["class_path"] == "cllm.data_modules.trajectory_data.TrajectoryDataModule"
    # the model spec is given once: the data module follows the module's (linked when the classes are built)
    assert parsed["model"]["init_args"]["model"] and parsed["data"]["init_args"]["model"] is None
    assert parsed["model"]["init_args"]["n"] is None and parsed["data"]["init_args"]["n"]  # n: the data's


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ablation_overlay_changes_only_its_delta(overlay, capsys):
    base = print_config(capsys, "smollm2-135m.yaml")
    changed = print_config(capsys, "smollm2-135m.yaml", overlay)
    delta = yaml.safe_load((bundled_config_dir() / overlay).read_text())
    for section in ("model", "data"):
        expected = dict(base[section]["init_args"])
        expected.update((delta.get(section) or {}).get("init_args", {}))
        assert changed[section]["init_args"] == expected, section
        assert changed[section]["class_path"] == base[section]["class_path"]
    assert changed["trainer"] == base["trainer"]


def test_llama7b_recipe(capsys):
    parsed = print_config(capsys, "llama7b.yaml")
    model, data, trainer = parsed["model"]["init_args"], parsed["data"]["init_args"], parsed["trainer"]
    assert data["n"] == 16 and model["lr"] == 2e-5 and model["warmup_ratio"] == 0.03 and model["ar_weight"] == 10
    assert model["label_smoothing"] == 0.1 and not model["ar_mask_prompt"]  # the official AR loss
    assert trainer["max_epochs"] == 1 and trainer["devices"] == 8
    assert trainer["strategy"]["class_path"].endswith("ModelParallelStrategy")
    assert model["activation_checkpointing"] and model["fsdp_param_dtype"] == "bfloat16"
    assert trainer["logger"]["class_path"].endswith("WandbLogger")


def test_json_extract_domain_overlay(capsys):
    parsed = print_config(capsys, "smollm2-135m.yaml", "domains/json-extract.yaml")
    data = parsed["data"]["init_args"]
    assert (data["prompts"], data["val_prompts"]) == ("json-extract:train", "json-extract:validation")
    assert data["path"] != "data/smollm2-135m"  # never mixed with the stdlib-code trajectories


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("overlay", OBJECTIVES + DOMAINS + OVERLAYS)
def test_every_overlay_composes_with_every_base(base, overlay, capsys):
    parsed = print_config(capsys, base, overlay)
    assert parsed["trainer"]["check_val_every_n_epoch"] is None  # validation by steps: any overlay's row count fits


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OBJECTIVES + OVERLAYS)
def test_every_objective_and_ablation_fits_the_tiny_config_two_steps(overlay, tmp_path):
    """The composition users type (`--config tiny.yaml --config objectives/jacobi_forcing.yaml`) trains, whatever
    the number of rows an epoch its layout leaves (JF: one row per prompt, fewer than val_check_interval)."""
    import subprocess

    argv = [
        "fit",
        "--config",
        "tiny.yaml",
        "--config",
        overlay,
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "cllm", *argv], capture_output=True, text=True, check=False, cwd=tmp_path
    )
    if done.returncode == 2:  # an overlay that cannot fit this base says so in one line naming both settings
        errors = [line for line in done.stderr.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert "data.init_args.n" in errors[0] and "data.init_args.max_new_tokens" in errors[0], errors[0]
    else:
        assert done.returncode == 0, done.stderr[-2000:]


def _built(args: list[str]):
    from cllm.lightning_cli import CLLMLightningCLI

    sys.argv = ["cllm"]  # LightningCLI warns when sys.argv holds arguments besides args (monkeypatched in the tests)
    return CLLMLightningCLI(run=False, args=["--config", str(bundled_config_dir() / "tiny.yaml"), *args])


def test_n_comes_from_the_data_and_is_linked_once(tmp_path, monkeypatch, caplog):
    """One owner: data n=8 with no module n -> the module and the callback use 8, said once; the model spec is
    given once (the data module follows the module's)."""
    from cllm.callbacks.accepted_tokens import AcceptedTokensCallback

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with caplog.at_level(logging.INFO):
        cli = _built(["--data.init_args.n=8", "--data.init_args.path=fresh"])
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, AcceptedTokensCallback)]
    assert cli.datamodule.n == cli.model.n == callback.n == 8
    assert callback.max_new_tokens == cli.datamodule.hparams.max_new_tokens == 16  # one owner: the data's budget
    assert cli.datamodule.model == cli.model.hparams.model == "tiny"
    said = [r.getMessage() for r in caplog.records if "block size n=" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("block size n=8 (from data.init_args.n)"), said


def test_n_comes_from_the_manifest_and_a_disagreeing_n_is_refused(tmp_path, monkeypatch):
    from cllm.errors import UserError
    from cllm.records import write_manifest

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    write_manifest(tmp_path / "data", {"model": "tiny", "tokenizer_fingerprint": "x", "n": 8, "shards": []})
    cli = _built(["--data.init_args.n=null", "--data.init_args.path=data"])
    assert cli.datamodule.n == cli.model.n == 8
    with pytest.raises(UserError, match=r"model.init_args.n=16 but the data's block size is n=8 .*manifest.json"):
        _built(["--data.init_args.n=null", "--data.init_args.path=data", "--model.init_args.n=16"])
    with pytest.raises(UserError, match="the dataset has block size n=8, the data module n=4"):
        _built(["--data.init_args.path=data"])

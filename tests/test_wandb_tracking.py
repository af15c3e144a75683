"""W&B tracking: offline decision, SLURM-stable run id, and a real offline fit read back from its `.wandb` file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

from cllm.tracking import WandbLogger, read_offline_run, resolve_mode, slurm_run_id, wandb_api_key_configured

HERE = Path(__file__).parent


class LoggingBoringModel(BoringModel):
    """BoringModel that logs a metric and a sample table, as CLLMModule and its callback do."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"])
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val/accepted_tokens_per_step", torch.tensor(1.5))
        return out

    def on_validation_epoch_end(self) -> None:
        if isinstance(self.logger, WandbLogger):
            self.logger.log_table("samples", columns=["prompt", "jacobi"], data=[["hi", "there"]])


def test_api_key_detection(tmp_path: Path) -> None:
    assert wandb_api_key_configured({"WANDB_API_KEY": "x" * 40})
    assert not wandb_api_key_configured({"HOME": str(tmp_path)})
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_api_key_configured({"HOME": str(tmp_path)})
    # A key for another host does not count when WANDB_BASE_URL points elsewhere.
    assert not wandb_api_key_configured({"HOME": str(tmp_path), "WANDB_BASE_URL": "https://wandb.example.org"})


def test_mode_resolution(tmp_path: Path) -> None:
    no_key = {"HOME": str(tmp_path)}
    assert resolve_mode(None, no_key) == "offline"
    assert resolve_mode(None, {**no_key, "WANDB_MODE": "online"}) is None  # wandb reads WANDB_MODE itself
    assert resolve_mode(None, {"WANDB_API_KEY": "k" * 40}) is None
    assert resolve_mode(True, {"WANDB_API_KEY": "k" * 40}) == "offline"
    assert resolve_mode(False, no_key) == "online"


def test_slurm_run_id_is_stable_per_job() -> None:
    assert slurm_run_id({}) is None
    assert slurm_run_id({"SLURM_JOB_ID": "17", "SLURM_CLUSTER_NAME": "c"}) == "slurm-c-17"
    array = {"SLURM_JOB_ID": "21", "SLURM_ARRAY_JOB_ID": "20", "SLURM_ARRAY_TASK_ID": "1", "SLURM_CLUSTER_NAME": "c"}
    assert slurm_run_id(array) == "slurm-c-20_1"


def _stub_env(home: Path) -> dict[str, str]:
    """No W&B key, no WANDB_MODE, no SLURM; the stub model importable from this folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]))
    return env


def _write_config(folder: Path, logger: str) -> Path:
    config = folder / "stub.yaml"
    config.write_text(
        "model: {class_path: test_wandb_tracking.LoggingBoringModel}\n"
        "data: {class_path: lightning.pytorch.demos.boring_classes.BoringDataModule}\n"
        "trainer:\n"
        "  max_epochs: 1\n  limit_train_batches: 3\n  limit_val_batches: 1\n  log_every_n_steps: 1\n"
        "  accelerator: cpu\n  devices: 1\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
        f"  logger: {logger}\n"
    )
    return config


@pytest.mark.slow
def test_offline_fit_pushes_config_metrics_and_table(tmp_path: Path) -> None:
    logger = "{class_path: cllm.tracking.WandbLogger, init_args: {project: cllm-test, group: g1, tags: [tiny]}}"
    config = _write_config(tmp_path, logger)
    root = tmp_path / "run"
    # No key anywhere (empty HOME, no WANDB_MODE): the logger must go offline by itself, not fail or prompt.
    env = _stub_env(tmp_path)
    # A fixed SLURM job id stands in for a requeue: both runs must land in the same W&B run.
    env["SLURM_JOB_ID"] = "4242"
    command = [sys.executable, "-m", "cllm", "fit", "--config", str(config), f"--trainer.default_root_dir={root}"]
    for attempt in range(2):  # the second run in the same folder must not crash on the saved config.yaml
        proc = subprocess.run(
            [*command, f"--trainer.logger.init_args.name=attempt{attempt}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (root / "config.yaml").is_file()
    runs = sorted((root / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    for run_dir in runs:
        run = read_offline_run(run_dir)
        assert run.run_id == "slurm-cluster-4242"
        assert (run.project, run.group, run.tags) == ("cllm-test", "g1", ["tiny"])
        # The full resolved config, as LightningCLI resolved it.
        config = run.config["config"]
        assert config["trainer"]["limit_train_batches"] == 3
        assert config["trainer"]["default_root_dir"] == str(root)
        assert config["model"]["class_path"] == "test_wandb_tracking.LoggingBoringModel"
        assert run.summary["val/accepted_tokens_per_step"] == pytest.approx(1.5)
        assert "train/loss" in run.summary and run.summary["trainer/global_step"] >= 2
        table = run.summary["samples"]
        assert table["_type"] == "table-file" and (run_dir / "files" / table["path"]).is_file()

"""SLURM helpers without a cluster: job ids, HPC checkpoint names, layout errors, and SLURMRequeue in one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel

from cllm.errors import UserError
from cllm.slurm import SLURMRequeue, check_slurm_layout, next_hpc_checkpoint, slurm_job_id


def test_job_id_and_checkpoint_names(tmp_path: Path) -> None:
    assert slurm_job_id({"SLURM_JOB_ID": "7"}) == "7"
    assert slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"}) == "8_1"
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    (tmp_path / "hpc_ckpt_2.ckpt").mkdir()  # FSDP2 checkpoints are folders
    (tmp_path / "hpc_ckpt_10.ckpt").touch()
    (tmp_path / "hpc_ckpt_x.ckpt").touch()
    assert next_hpc_checkpoint(tmp_path) == tmp_path / "hpc_ckpt_11.ckpt"


def test_layout_mismatch_names_the_settings() -> None:
    env = {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "fit"}
    check_slurm_layout(2, 2, env)
    check_slurm_layout("auto", 2, env)  # Lightning decides, nothing to compare
    check_slurm_layout("0,1", 2, env)
    with pytest.raises(UserError, match=r"--trainer.devices=2.*--ntasks-per-node=4"):
        check_slurm_layout(4, 2, env)
    with pytest.raises(UserError, match=r"--trainer.num_nodes=2.*--nodes=1"):
        check_slurm_layout(2, 1, env)
    with pytest.raises(UserError, match="--ntasks-per-node"):
        check_slurm_layout(2, 1, {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "fit"})
    check_slurm_layout(4, 1, {**env, "SLURM_JOB_NAME": "bash"})  # interactive: not Lightning's SLURM mode
    check_slurm_layout(4, 1, {})  # not under SLURM


def test_layout_error_from_the_cli(tmp_path: Path) -> None:
    config = tmp_path / "stub.yaml"
    config.write_text(
        "model: {class_path: lightning.pytorch.demos.boring_classes.BoringModel}\n"
        "data: {class_path: lightning.pytorch.demos.boring_classes.BoringDataModule}\n"
        "trainer: {accelerator: cpu, logger: false}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_NNODES="1", SLURM_JOB_NAME="fit")
    command = [sys.executable, "-m", "cllm", "fit", "--config", str(config), "--trainer.devices=3"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "set --trainer.devices=2" in proc.stderr and "--ntasks-per-node=3" in proc.stderr
    assert "Traceback" not in proc.stderr


class SignalAt(Callback):
    """Sends SIGUSR1 to this process after `step` optimizer steps, as `scancel --signal=USR1` would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_requeue_saves_at_step_boundary_and_stops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A one-task SLURM batch job, as Lightning's SLURMEnvironment reads it; `scontrol` is a stub that records its args.
    slurm = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "fit"}
    slurm |= {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    slurm |= {"SLURM_NODELIST": "localhost"}
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        trainer = Trainer(
            default_root_dir=tmp_path,
            max_steps=20,
            accelerator="cpu",
            devices=1,
            callbacks=[SLURMRequeue(), SignalAt(step=3)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(BoringModel())
    finally:
        signal.signal(signal.SIGUSR1, previous)
    # Saved at the end of the step during which the signal came, then stopped instead of training on.
    assert trainer.global_step == 4
    checkpoint = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 4
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    # What the requeued job does: Lightning finds the newest hpc_ckpt in default_root_dir and resumes there.
    resumed = Trainer(
        default_root_dir=tmp_path,
        max_steps=6,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    resumed.fit(BoringModel())
    assert resumed.global_step == 6

"""`sbatch scripts/slurm/fit.sbatch` against a real Slurm: a 2-rank FSDP2 fit on CPU, then a preempt-and-requeue.

Needs a running controller: `scripts/slurm/local_cluster.sh start` (what .ci/run does) or any Slurm whose `sinfo`
answers. SLURM_CONF is taken from the environment, else from the local cluster's folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cllm.tracking import read_offline_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FIT_SBATCH = REPO / "scripts" / "slurm" / "fit.sbatch"
LOCAL_CONF = Path(os.environ.get("CLLM_SLURM_DIR", "/tmp/cllm-slurm")) / "slurm.conf"


def _slurm_env() -> dict[str, str]:
    # A pytest started inside an allocation must not hand its own job's variables to the jobs it submits.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    if "SLURM_CONF" not in env and LOCAL_CONF.is_file():
        env["SLURM_CONF"] = str(LOCAL_CONF)
    env.update(PYTHON=sys.executable, ACCELERATOR="cpu", STRATEGY="fsdp2", WANDB_MODE="offline")
    return env


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        pytest.skip("Slurm is not installed (sbatch/sinfo not found); run scripts/slurm/local_cluster.sh start")
    env = _slurm_env()
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True, timeout=30)
    if probe.returncode or not probe.stdout.strip():
        reason = probe.stderr.strip() or "no nodes"
        pytest.skip(f"Slurm controller not reachable ({reason}); run scripts/slurm/local_cluster.sh start")
    return env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One folder for both tests: the first job collects the tiny trajectories (data/...), the second reuses them.
    return tmp_path_factory.mktemp("slurm")


def submit(env: dict[str, str], workdir: Path, run_dir: Path, *overrides: str) -> str:
    command = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none"]
    command += [f"--chdir={workdir}", f"--output={workdir}/job-%j.out", "--time=10", str(FIT_SBATCH), "tiny.yaml"]
    proc = subprocess.run(
        [*command, *overrides], env={**env, "RUN_DIR": str(run_dir)}, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(env: dict[str, str], job: str, states: tuple[str, ...], timeout: float, output: Path) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    log = output.read_text()[-4000:] if output.is_file() else "(no output)"
    pytest.fail(f"job {job} not in {states} after {timeout:.0f} s: {job_info(env, job).get('JobState')}\n{log}")


def train_steps(metrics_csv: Path) -> list[int]:
    return [int(row["step"]) for row in csv.DictReader(metrics_csv.open()) if row.get("train/loss")]


def test_two_rank_fsdp2_fit_completes_with_checkpoint(slurm: dict[str, str], workdir: Path) -> None:
    run_dir = workdir / "runs" / "fit"
    job = submit(slurm, workdir, run_dir, f"--trainer.logger.init_args.save_dir={run_dir}")
    output = workdir / f"job-{job}.out"
    info = wait_for(slurm, job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 420, output)
    log = output.read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    # Lightning's SLURMEnvironment gave the two srun tasks ranks 0 and 1 of one process group.
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log and "Trainer.fit` stopped: `max_steps=6` reached" in log
    assert "ModelParallelStrategy" in (run_dir / "logs" / "version_0" / "config.yaml").read_text()
    # FSDP2 writes a sharded (distributed) checkpoint: a folder with one shard per rank and Lightning's meta.pt.
    checkpoints = sorted((run_dir / "checkpoints").glob("epoch=*.ckpt"))  # <default_root_dir>/checkpoints
    assert checkpoints, log[-4000:]
    assert sorted(p.name for p in checkpoints[-1].glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert torch.load(checkpoints[-1] / "meta.pt", weights_only=True)["global_step"] >= 3


def test_requeue_resumes_at_the_saved_step(slurm: dict[str, str], workdir: Path) -> None:
    run_dir = workdir / "runs" / "requeue"
    loggers = workdir / "loggers.yaml"  # CSV for the steps, W&B (offline) for the pinned run id
    loggers.write_text(
        "trainer:\n  logger:\n"
        f"    - {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {run_dir}, name: logs}}}}\n"
        # save_dir and name spelled out: jsonargparse would carry tiny.yaml's CSVLogger values over to this class
        "    - class_path: cllm.tracking.WandbLogger\n"
        f"      init_args: {{project: cllm-test, save_dir: {run_dir}, name: requeue}}\n"
    )
    max_steps = 40
    overrides = ["--config", str(loggers), f"--trainer.max_steps={max_steps}", "--trainer.limit_val_batches=0"]
    job = submit(slurm, workdir, run_dir, *overrides)
    output = workdir / f"job-{job}.out"
    # Preempt once training has made a few steps (read live from the W&B transaction log).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        runs = sorted(run_dir.glob("wandb/offline-run-*"))
        steps = [row.get("trainer/global_step", 0) for row in read_offline_run(runs[0]).history] if runs else []
        if max(steps, default=0) >= 3:
            break
        assert job_info(slurm, job).get("JobState") in ("PENDING", "RUNNING"), output.read_text()[-4000:]
        time.sleep(1)
    # What `#SBATCH --signal=SIGUSR1@90` does before the time limit: SIGUSR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)
    info = wait_for(slurm, job, ("PENDING", "COMPLETED", "FAILED"), 120, output)
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", output.read_text()[-4000:]
    # Slurm holds a requeued job back (BeginTime, ~2 min); let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm, check=True)
    info = wait_for(slurm, job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 420, output)
    log = output.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-4000:]

    hpc = run_dir / "hpc_ckpt_1.ckpt"
    saved_step = torch.load(hpc / "meta.pt", weights_only=True)["global_step"]
    assert saved_step >= 3
    assert f"Restored all states from the checkpoint at {hpc}" in log
    first, second = (train_steps(run_dir / "logs" / f"version_{v}" / "metrics.csv") for v in (0, 1))
    # The second attempt starts at the saved step (not 0) and finishes the run; the first stopped there.
    assert min(second) == saved_step and max(second) == max_steps - 1
    # Lightning's SIGUSR1 handler flushes the loggers and then saves: a signal that lands between an optimizer step
    # (global_step already counted) and that step's log call leaves that one row out of the first attempt's CSV.
    # What matters is that the first attempt never logged a step past the checkpoint it saved.
    assert saved_step - 2 <= max(first) <= saved_step - 1
    assert list((run_dir / "checkpoints").glob(f"*-step={max_steps}.ckpt"))
    # Both attempts wrote into the same W&B run (id derived from the job id).
    runs = [read_offline_run(p) for p in sorted(run_dir.glob("wandb/offline-run-*"))]
    assert len(runs) == 2 and {r.run_id for r in runs} == {runs[0].run_id} and runs[0].run_id.endswith(f"-{job}")
    # The resolved config and the module's metrics are in the W&B run.
    last = runs[1]
    config = last.config["config"]
    assert config["model"]["class_path"] == "cllm.module.CLLMModule" and config["trainer"]["max_steps"] == 40
    assert last.config["model"] == "tiny"  # CLLMModule's own hyperparameters sit beside it
    assert "train/loss" in last.summary and "val/accepted_tokens_per_step" in last.summary
    # The callback's sample table (logged with the step-0 measurement, i.e. by the first attempt).
    table = runs[0].summary["val/samples"]
    assert table["_type"] == "table-file" and (runs[0].path / "files" / table["path"]).is_file()


def test_trajectories_sbatch_collects_over_two_ranks(slurm: dict[str, str], workdir: Path) -> None:
    command = ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--time=10"]
    command += [f"--chdir={workdir}", f"--output={workdir}/job-%j.out", str(REPO / "scripts/slurm/trajectories.sbatch")]
    command += ["--model", "tiny", "--prompts", "stdlib-code:train", "--limit", "8", "--n", "4"]
    command += ["--max_new_tokens", "16", "--chat_template", "false", "--shard_size", "2", "--output", "collected"]
    proc = subprocess.run(command, env=slurm, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    output = workdir / f"job-{job}.out"
    info = wait_for(slurm, job, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, output)
    log = output.read_text()
    assert info["JobState"] == "COMPLETED", log[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    manifest = json.loads((workdir / "collected" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 4 and sum(s["records"] for s in manifest["shards"]) > 0


def test_ablate_sbatch_array_runs_each_overlay(slurm: dict[str, str], workdir: Path) -> None:
    overlay = workdir / "overlays" / "small_lr.yaml"
    overlay.parent.mkdir(exist_ok=True)
    overlay.write_text("model: {init_args: {lr: 1.0e-4}}\n")
    root = workdir / "runs" / "ablate"
    env = {**slurm, "OVERLAYS": str(overlay), "ROOT": str(root)}
    command = ["sbatch", "--parsable", "--array=0-1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none"]
    command += ["--time=10", f"--chdir={workdir}", f"--output={workdir}/job-%A_%a.out"]
    command += [str(REPO / "scripts/slurm/ablate.sbatch"), "tiny.yaml"]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    for task in (0, 1):
        output = workdir / f"job-{job}_{task}.out"
        info = wait_for(slurm, f"{job}_{task}", ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300, output)
        assert info["JobState"] == "COMPLETED", output.read_text()[-4000:]
    collect = [sys.executable, "-m", "cllm", "ablate", "--collect", str(root), "--output", str(workdir / "abl.md")]
    proc = subprocess.run(collect, env=slurm, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {row["run"]: row for row in csv.DictReader((workdir / "abl.csv").open())}
    assert sorted(rows) == ["baseline", "small_lr"] and rows["small_lr"]["change"] == "model.lr=0.0001"
    assert all(row["status"] == "ok" and float(row["val/accepted_tokens_per_step"]) >= 1 for row in rows.values())

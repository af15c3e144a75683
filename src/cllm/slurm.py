"""SLURM support for `cllm fit`: a preemption-safe requeue, and a clear error when the allocation and trainer disagree.

Lightning's own SIGUSR1 handler saves the HPC checkpoint from inside the signal handler. Each rank gets the signal at
a different point of its step, so under FSDP2 one rank enters the checkpoint's collectives while another is still in
a gradient all-reduce: the ranks deadlock or crash (seen here with 2 gloo ranks). `SLURMRequeue` only sets a flag in
the handler; at the end of every training batch the ranks agree on the flag (one all-reduce of a bool) and, together,
save `hpc_ckpt_N.ckpt` in `default_root_dir` and requeue the job. The requeued job (same job id, same
`default_root_dir`) resumes from that checkpoint through Lightning's usual HPC resume.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cllm.errors import UserError


def slurm_job_id(env: dict[str, str] | os._Environ | None = None) -> str:
    """The id `scontrol requeue` wants: `<array job>_<task>` for an array task, else the job id."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def next_hpc_checkpoint(folder: str | os.PathLike) -> Path:
    """`hpc_ckpt_{N+1}.ckpt` after the highest existing N: the name Lightning's HPC resume looks for."""
    versions = [
        int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*") if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))
    ]
    return Path(folder) / f"hpc_ckpt_{max(versions, default=0) + 1}.ckpt"


class SLURMRequeue(Callback):
    """On SIGUSR1 (`#SBATCH --signal=SIGUSR1@90`, `scancel --signal=USR1 JOB`): all ranks save at a step boundary,
    then rank 0 runs `scontrol requeue`. Inert outside a SLURM batch job or with `SLURMEnvironment(auto_requeue=False)`.
    """

    def __init__(self) -> None:
        self.active = False
        self.requested = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Single-device strategies have no cluster_environment; the connector holds it for every strategy.
        environment = getattr(trainer.strategy, "cluster_environment", None)
        environment = environment or trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue:
            return
        self.active = True
        # Installed before the trainer registers its own: Lightning then leaves SIGUSR1 to us.
        signal.signal(environment.requeue_signal or signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Nothing collective here: the main thread may be inside an all-reduce of this very rank.
        self.requested = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.active:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.active = False  # once: the job is about to be killed
        rank_zero_info(f"SLURM requeue signal: saving at step {trainer.global_step} and requeueing")
        for logger in trainer.loggers:
            logger.finalize("finished")  # flush metrics the requeued run will not rewrite
        path = next_hpc_checkpoint(trainer.default_root_dir) if trainer.is_global_zero else None
        path = trainer.strategy.broadcast(path)
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("slurm_requeue_saved")
        if trainer.is_global_zero:
            job = slurm_job_id()
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                rank_zero_warn(f"`scontrol requeue {job}` failed ({result.returncode}): {result.stderr.strip()}")
            else:
                rank_zero_info(f"requeued SLURM job {job}; it resumes from {path}")
        # No more steps: they would be lost (and logged twice); SLURM kills this attempt anyway.
        trainer.should_stop = True


def _device_count(devices: object) -> int | None:
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return None  # "auto", -1: Lightning decides


def check_slurm_layout(devices: object, num_nodes: object, env: dict[str, str] | None = None) -> None:
    """Under SLURM, one task per device: `--ntasks-per-node` must equal `trainer.devices`, `--nodes` `num_nodes`.

    Checked before the trainer is built so the message names both settings; Lightning's own check is less clear.

    Raises:
        UserError: the SLURM allocation and the trainer disagree.
    """
    env = dict(os.environ if env is None else env)
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return  # what SLURMEnvironment.detect() checks: not a batch SLURM job, Lightning ignores SLURM too
    ntasks = int(env["SLURM_NTASKS"])
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    count = _device_count(devices)
    if per_node is None:
        if ntasks > 1:
            raise UserError(
                f"SLURM job has --ntasks={ntasks} but no --ntasks-per-node: Lightning needs one task per device; "
                f"submit with --ntasks-per-node=<devices per node> and --nodes=<nodes> instead of --ntasks"
            )
        return
    per_node_count = int(per_node.split("(")[0])
    if count is not None and count != per_node_count:
        raise UserError(
            f"trainer.devices={devices} but SLURM runs --ntasks-per-node={per_node_count} tasks per node; "
            f"set --trainer.devices={per_node_count} (what scripts/slurm/fit.sbatch passes) "
            f"or submit with sbatch --ntasks-per-node={count}"
        )
    nnodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nnodes is not None and num_nodes is not None and int(num_nodes) != int(nnodes):
        raise UserError(
            f"trainer.num_nodes={num_nodes} but the SLURM job has --nodes={nnodes}; "
            f"set --trainer.num_nodes={nnodes} or submit with sbatch --nodes={num_nodes}"
        )

"""The LightningCLI behind `python -m cllm fit|validate|test|predict`.

Model and data module are chosen by `class_path` in the config (subclass mode), so configs read like
`model: {class_path: cllm.module.CLLMModule, init_args: {...}}`.
"""

from __future__ import annotations

import os

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from cllm.errors import UserError


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the log folder (Lightning's behaviour) and pushes the resolved config to every logger."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Dump then load: jsonargparse serializes Paths, Namespaces and class_path blocks the way the YAML reads.
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class CLLMLightningCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        # A second run in the same folder must not fail on the config.yaml the first one saved.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, args=args, **kwargs)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_slurm_layout(config.trainer.get("devices"), config.trainer.get("num_nodes"))
        default_wandb_save_dir(config.trainer)


def default_wandb_save_dir(trainer_config) -> None:
    """Point cllm's WandbLogger at `default_root_dir` when it names no `save_dir`, so a run keeps all in one folder."""
    loggers = trainer_config.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if getattr(logger, "class_path", None) == "cllm.tracking.WandbLogger" and not logger.init_args.get("save_dir"):
            logger.init_args.save_dir = str(trainer_config.get("default_root_dir") or os.getcwd())


def _device_count(devices) -> int | None:
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, str) and devices.strip().isdigit():
        return int(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    if isinstance(devices, (list, tuple)):
        return len(devices)
    return None  # "auto", -1: Lightning decides


def check_slurm_layout(devices, num_nodes, env: dict[str, str] | None = None) -> None:
    """Under SLURM, one task per device: `--ntasks-per-node` must equal `trainer.devices`, `--nodes` `num_nodes`.

    Checked here so the message names both settings; Lightning's own check comes later and is less clear.

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

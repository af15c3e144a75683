"""The LightningCLI behind `python -m cllm fit|validate|test|predict`.

Model and data module are chosen by `class_path` in the config (subclass mode), so configs read like
`model: {class_path: cllm.module.CLLMModule, init_args: {...}}`.
"""

from __future__ import annotations

import os
import sys

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from cllm.arguments import normalize_flags, one_line, resolve_config_args
from cllm.errors import UserError
from cllm.safe_checkpoint import guard_checkpoint_loading
from cllm.slurm import SLURMRequeue, check_slurm_layout


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Saves config.yaml in the log folder (Lightning's behaviour) and logs the resolved config to every logger as
    the hyperparameter `config` (W&B: `config.trainer.max_steps`, ...)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Dump then load: jsonargparse serializes Paths, Namespaces and class_path blocks the way the YAML reads.
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            # Under one key: the module's own hparams (logged later, at the top level) would overwrite `model`, ...
            logger.log_hyperparams({"config": config})


class CLLMLightningCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        # A second run in the same folder must not fail on the config.yaml the first one saved.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        # Extra callbacks are appended to the configured ones; SLURMRequeue is inert outside a SLURM batch job.
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        defaults["callbacks"] = [*defaults.get("callbacks", []), SLURMRequeue()]
        kwargs["trainer_defaults"] = defaults
        super().__init__(LightningModule, LightningDataModule, args=args, **kwargs)

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        guard_checkpoint_loading(trainer.strategy)  # `--ckpt_path` folders cannot run code; corrupt ones: one line
        return trainer

    def init_parser(self, **kwargs) -> LightningArgumentParser:
        kwargs.setdefault("exit_on_error", False)  # errors become one-line UserErrors in parse_arguments
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except Exception as err:  # jsonargparse's ArgumentError
            if type(err).__name__ != "ArgumentError":
                raise
            argv = args if isinstance(args, list) else sys.argv[1:]
            # the subcommand's parser holds the option types the message names
            subcommand = getattr(self, "_subcommand_parsers", {}).get(argv[0] if argv else None, parser)
            raise UserError(one_line(str(err), subcommand)) from None

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


def run_lightning(argv: list[str]) -> None:
    """`cllm fit|validate|test|predict ARGS`: config names resolved, both flag spellings, then LightningCLI."""
    # LightningCLI reads sys.argv itself (passing args= too only earns a warning); show `cllm` as the program.
    sys.argv = ["cllm", *normalize_flags(resolve_config_args(argv))]
    CLLMLightningCLI()

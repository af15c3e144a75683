"""The LightningCLI behind `python -m cllm fit|validate`.

Model and data module are chosen by `class_path` in the config (subclass mode), so configs read like
`model: {class_path: cllm.module.CLLMModule, init_args: {...}}`.
"""

from __future__ import annotations

import os
import re
import sys

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info

from cllm.arguments import normalize_flags, one_line, resolve_config_args
from cllm.errors import UserError
from cllm.hardware import auto_dtype, autocast_precision
from cllm.records import block_size
from cllm.safe_checkpoint import UNREADABLE, exception_line, guard_checkpoint_loading
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

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # jsonargparse wraps an error raised in a class's __init__ (Optional[...] types)
            cause = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads a `--ckpt_path` file's hyperparameters while parsing: a corrupt file is one line too.
        try:
            super()._parse_ckpt_path()
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 -- random bytes reach the unpickler's every error (UnicodeDecodeError...)
            ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
            raise UserError(f"{ckpt_path}: {UNREADABLE}: {exception_line(err)}") from None

    def instantiate_trainer(self, **kwargs) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        guard_checkpoint_loading(trainer.strategy)  # `--ckpt_path` folders cannot run code; corrupt ones: one line
        pin_checkpoint_folders(trainer)
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
            raise UserError(nested_class_error(str(err)) or one_line(str(err), subcommand)) from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_slurm_layout(config.trainer.get("devices"), config.trainer.get("num_nodes"))
        default_wandb_save_dir(config.trainer)
        link_settings(config)
        match_precision(config)


def _init_args(entry) -> Namespace | None:
    return getattr(entry, "init_args", None) if isinstance(entry, Namespace) else None


def link_settings(config: Namespace) -> None:
    """One owner per setting. The model spec is the module's: a data module that takes `model` and leaves it unset
    follows `model.init_args.model`. The block size n is the data's (its manifest's when the dataset exists, else
    `data.init_args.n`, see `cllm.records.block_size`): it is linked into the module and every callback that takes
    an `n`, and printed once. A module or callback n that disagrees is an error (drop it). A callback's unset
    `max_new_tokens` follows the data's (the trajectories' length)."""
    data, model = _init_args(config.get("data")), _init_args(config.get("model"))
    if data is not None and model is not None and "model" in data and data.get("model") is None and "model" in model:
        data.model = model.model
    if data is None or "n" not in data or "path" not in data:
        return
    n, source = block_size(data.path, data.get("n"))
    data.n = n
    callbacks = config.trainer.get("callbacks") or []
    targets = [("model.init_args.n", model)] + [
        (f"trainer.callbacks[{i}] ({entry.class_path.rpartition('.')[2]}).init_args.n", _init_args(entry))
        for i, entry in enumerate(callbacks if isinstance(callbacks, list) else [callbacks])
    ]
    for _, target in targets[1:]:
        if target is not None and "max_new_tokens" in target and target.get("max_new_tokens") is None:
            target.max_new_tokens = data.get("max_new_tokens")
    linked = []
    for name, target in targets:
        if target is None or "n" not in target:
            continue
        if target.get("n") is not None and target.n != n:
            raise UserError(f"{name}={target.n} but the data's block size is n={n} ({source}); drop {name}")
        target.n = n
        linked.append(name)
    rank_zero_info(f"block size n={n} (from {source}) -> " + (", ".join(linked) or "no other setting"))


def match_precision(config) -> None:
    """`model.dtype: auto` and no `trainer.precision`: train float32 weights at the compute dtype `auto` picks on the
    trainer's accelerator (`cllm.hardware`): bf16-mixed where bf16 is fast, 16-mixed on CUDA without bf16, else
    32-true. An explicit precision (llama7b.yaml: 32-true under FSDP2's bf16 policy) is kept."""
    model = config.get("model")
    init_args = getattr(model, "init_args", None) or {}
    if config.trainer.get("precision") is not None or init_args.get("dtype") != "auto":
        return
    accelerator = str(config.trainer.get("accelerator") or "auto")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if accelerator in ("gpu", "cuda") else accelerator
    config.trainer.precision = autocast_precision(auto_dtype(device))


def nested_class_error(message: str) -> str | None:
    """jsonargparse's error for a bad value inside a class block (`--model.init_args.lr=abc`) nests the reason in
    a list of union subtypes; keep the innermost key and reason (None for other errors)."""
    text = " ".join(message.split())
    keys = re.findall(r'Parser key "([^"]+)": ', text)
    if len(keys) < 2 or "Problem with given class_path" not in text:
        return None
    reason = text.rsplit(f'Parser key "{keys[-1]}": ', 1)[1].split(" - ")[0]
    return f"--{keys[0]}.init_args.{keys[-1]}: {reason}"


def pin_checkpoint_folders(trainer: Trainer) -> None:
    """Checkpoints without a `dirpath` go to `<default_root_dir>/checkpoints` with a `last.ckpt` link to the newest.

    Lightning's default folder is the logger's `version_N/checkpoints`, and a new run looks in `version_N+1`, so
    `--ckpt_path last` found nothing and silently restarted at step 0. With validation off (`limit_val_batches:
    0`) a checkpoint is saved at the end of each training epoch (and of the run): the base configs count validation
    in steps (`check_val_every_n_epoch: null`), under which Lightning would otherwise save only after validations.
    """
    no_validation = trainer.limit_val_batches == 0
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = os.path.realpath(os.path.join(trainer.default_root_dir, "checkpoints"))
            if callback.save_last is None:
                callback.save_last = "link"
        if isinstance(callback, ModelCheckpoint) and no_validation and callback._save_on_train_epoch_end is None:
            callback._save_on_train_epoch_end = True  # the constructor's save_on_train_epoch_end, left unset


def default_wandb_save_dir(trainer_config) -> None:
    """Point cllm's WandbLogger at `default_root_dir` when it names no `save_dir`, so a run keeps all in one folder."""
    loggers = trainer_config.get("logger")
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if getattr(logger, "class_path", None) == "cllm.tracking.WandbLogger" and not logger.init_args.get("save_dir"):
            logger.init_args.save_dir = str(trainer_config.get("default_root_dir") or os.getcwd())


def run_lightning(argv: list[str]) -> None:
    """`cllm fit|validate ARGS`: config names resolved, both flag spellings, then LightningCLI."""
    # LightningCLI reads sys.argv itself (passing args= too only earns a warning); show `cllm` as the program.
    sys.argv = ["cllm", *normalize_flags(resolve_config_args(argv))]
    try:
        CLLMLightningCLI()
    except MisconfigurationException as err:  # Lightning's word for a setting that cannot work (one line here)
        raise UserError(exception_line(err)) from None
    # Lightning leaves the process group up. Left to interpreter exit, gloo's worker threads can outlive it and
    # abort the process ("terminate called without an active exception"), failing a Slurm step that had finished.
    # Only after a clean run: destroying it while another rank is still in a collective would hang.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()

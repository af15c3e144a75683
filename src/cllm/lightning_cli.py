"""The LightningCLI behind `python -m cllm fit|validate|test|predict`.

Model and data module are chosen by `class_path` in the config (subclass mode), so configs read like
`model: {class_path: cllm.module.CLLMModule, init_args: {...}}`.
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class CLLMLightningCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # A second run in the same folder must not fail on the config.yaml the first one saved.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, args=args, **kwargs)

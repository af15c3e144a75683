"""Test helpers around Lightning: a quiet CPU Trainer and a module that records which batches it trained on."""

from __future__ import annotations

import lightning as L
import torch


def quiet_trainer(**kwargs) -> L.Trainer:
    """A one-device CPU Trainer without logger, checkpoints, progress bar, summary or validation (each overridable)."""
    options = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    return L.Trainer(**{**options, **kwargs})


class BatchRecorder(L.LightningModule):
    """Trains one scalar and records, per global step, the column `column` of each row of the batch's input_ids
    (in the synthetic trajectory datasets of the tests: the record number)."""

    def __init__(self, column: int) -> None:
        super().__init__()
        self.column = column
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, int, list[int]]] = []  # (epoch, global step, record numbers)

    def training_step(self, batch, batch_idx):
        rows = [row[self.column] for row in batch["input_ids"].tolist()]
        self.seen.append((self.current_epoch, self.global_step, rows))
        return (self.weight - 1) ** 2

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    @property
    def by_step(self) -> dict[int, list[int]]:
        return {step: rows for _, step, rows in self.seen}

    @property
    def by_epoch(self) -> dict[int, list[int]]:
        orders: dict[int, list[int]] = {}
        for epoch, _, rows in self.seen:
            orders.setdefault(epoch, []).extend(rows)
        return orders

"""One progress line every few training steps, for a terminal that shows only what `cllm run` passes through.

    [progress] step 40/200  loss 1.234  val tokens/step 1.85  elapsed 3m10s  remaining ~12m40s

`cllm run` adds this callback to the fit it starts and prints the lines that begin with `[progress]` while the
whole output goes to the log file; any `cllm fit` can take it (`--trainer.callbacks+=cllm.callbacks.progress.
ProgressCallback`). Remaining time = elapsed / steps done x steps left (validation included in the average).
"""

from __future__ import annotations

import sys
import time

import lightning.pytorch as pl

PREFIX = "[progress]"
VALIDATION_METRIC = "val/accepted_tokens_per_step"


def duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{rest:02d}s"


def progress_line(step: int, total: int | None, metrics: dict, elapsed: float) -> str:
    """The line printed at `step` of `total` (None: unbounded) with the latest logged metrics."""
    parts = [f"{PREFIX} step {step}/{total if total else '?'}"]
    if "train/loss" in metrics:
        parts.append(f"loss {float(metrics['train/loss']):.3f}")
    if VALIDATION_METRIC in metrics:
        parts.append(f"val tokens/step {float(metrics[VALIDATION_METRIC]):.2f}")
    parts.append(f"elapsed {duration(elapsed)}")
    if total and step:
        parts.append(f"remaining ~{duration(elapsed / step * max(total - step, 0))}")
    return "  ".join(parts)


class ProgressCallback(pl.Callback):
    """Print `progress_line` every `every_n_steps` optimizer steps, after each validation and at the end (rank 0).

    Args:
        every_n_steps: steps between two lines.
    """

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.start = time.monotonic()
        self.printed = (-1, None)  # (step, validated): one line per step and event, whatever the accumulation

    def _print(self, trainer: pl.Trainer, event: str = "train") -> None:
        if trainer.is_global_zero and self.printed != (trainer.global_step, event):
            self.printed = (trainer.global_step, event)
            total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            metrics = dict(trainer.callback_metrics)
            print(progress_line(trainer.global_step, total, metrics, time.monotonic() - self.start), file=sys.stdout)
            sys.stdout.flush()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.global_step % self.every_n_steps == 0 and trainer.global_step > 0:
            self._print(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._print(trainer, "validation")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "end")

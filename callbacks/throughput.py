"""`ThroughputCallback`: training speed in the progress bar, the CSV log and W&B, every training batch.

Logged (summed or averaged over ranks):
- `train/seconds_per_step`: wall time from the end of one training batch to the end of the next (the slowest rank);
- `train/tokens_per_s`: real (non-padding) trajectory tokens of all ranks' batches per second (`real_tokens`);
- `train/samples_per_s`: batch rows of all ranks per second;
- `train/mfu`: model FLOPs utilisation, the FLOPs of the batch's forward and backward passes over the time the
  batch took and the device's peak FLOP/s at the compute dtype (`cllm.hardware.peak_flops`, or `peak_flops`
  given here); logged only where the peak is known (CUDA devices in Lightning's table).

FLOPs are counted from what the model actually ran during the training batch (a forward pre-hook sees every
forward's [rows, L] input, with or without grad), with the usual convention (Kaplan et al. 2020; PaLM, app. B):

    flops = 6 N T_grad + 2 N T_no_grad + 12 l d Σ_rows L² (grad) + 4 l d Σ_rows L² (no grad)

N: parameters that multiply per token (all but the input embedding; a tied LM head counts once), T: tokens fed,
l layers, d hidden size. Activation-checkpointing recomputation is not counted (it is MFU, not hardware FLOPs).
The batch's time runs from the end of the previous training batch, so it includes data loading and the optimizer.
"""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from cllm.hardware import peak_flops
from cllm.models import resolve_dtype
from cllm.module import real_tokens

COMPUTE_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}  # a Trainer precision prefix -> its matmul dtype


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters used in a matmul per token: all but the input embedding (a lookup), the LM head counted once."""
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are yielded once
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    return total - (0 if tied else embedding.weight.numel())


def step_flops(parameters: int, layers: int, hidden: int, counts: dict[str, float]) -> float:
    """Training FLOPs of the forwards in `counts` (see the module docstring): tokens and Σ L² with and without grad."""
    return (
        6 * parameters * counts["grad_tokens"]
        + 2 * parameters * counts["no_grad_tokens"]
        + 12 * layers * hidden * counts["grad_squares"]
        + 4 * layers * hidden * counts["no_grad_squares"]
    )


class ForwardCounter:
    """Counts the tokens (and Σ_rows L²) of a model's forwards while armed, split by whether grad was on."""

    def __init__(self) -> None:
        self.armed = False
        self.counts = self.empty()

    @staticmethod
    def empty() -> dict[str, float]:
        return {"grad_tokens": 0, "no_grad_tokens": 0, "grad_squares": 0, "no_grad_squares": 0}

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not self.armed or ids is None:
            return
        rows, length = ids.shape[0], ids.shape[-1]
        kind = "grad" if torch.is_grad_enabled() else "no_grad"
        self.counts[f"{kind}_tokens"] += rows * length
        self.counts[f"{kind}_squares"] += rows * length * length

    def take(self) -> dict[str, float]:
        counts, self.counts = self.counts, self.empty()
        return counts


class ThroughputCallback(Callback):
    """Logs tokens/s, samples/s and MFU of training (see the module docstring).

    Args:
        peak_flops: peak FLOP/s of one device at the compute dtype; None looks it up (known for CUDA devices).
        prog_bar: show tokens/s (and MFU when known) in the progress bar.
    """

    def __init__(self, peak_flops: float | None = None, prog_bar: bool = True) -> None:
        self.peak_flops = peak_flops
        self.prog_bar = prog_bar
        self.counter = ForwardCounter()
        self._hooked: torch.nn.Module | None = None
        self._last_end: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_end = None
        self._peak = self.peak_flops or peak_flops(pl_module.device, compute_dtype(trainer, pl_module))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        model = pl_module.model
        if self._hooked is not model:  # the model is built in configure_model: hook it on first sight
            model.register_forward_pre_hook(self.counter, with_kwargs=True)
            self._hooked = model
        self.counter.armed = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        self.counter.armed = False
        counts = self.counter.take()
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now, last = time.perf_counter(), self._last_end
        self._last_end = now
        if last is None:  # the first batch's time includes warm-up (and compilation): not a speed
            return
        seconds = max(now - last, 1e-9)
        rows = batch["input_ids"].shape[0]
        log = dict(on_step=True, on_epoch=False, sync_dist=True, batch_size=rows)
        tokens = real_tokens(batch, pl_module.n)
        pl_module.log("train/tokens_per_s", tokens / seconds, prog_bar=self.prog_bar, reduce_fx="sum", **log)
        pl_module.log("train/samples_per_s", rows / seconds, reduce_fx="sum", **log)
        pl_module.log("train/seconds_per_step", seconds, reduce_fx="max", **log)  # any validation in between too
        if self._peak:
            config = pl_module.model.config
            parameters = matmul_parameters(pl_module.model)
            flops = step_flops(parameters, config.num_hidden_layers, config.hidden_size, counts)
            pl_module.log("train/mfu", flops / seconds / self._peak, prog_bar=self.prog_bar, **log)


def compute_dtype(trainer: Trainer, pl_module: LightningModule) -> torch.dtype:
    """The matmul dtype of training: the Trainer's half precision, else FSDP2's param dtype, else the weights'."""
    precision = str(trainer.precision)
    for prefix, dtype in COMPUTE_DTYPES.items():
        if precision.startswith(prefix):
            return dtype
    fsdp_dtype = getattr(pl_module, "hparams", {}).get("fsdp_param_dtype")
    if fsdp_dtype:
        return resolve_dtype(fsdp_dtype, pl_module.device)
    return next(pl_module.parameters()).dtype

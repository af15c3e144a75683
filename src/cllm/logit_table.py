"""Logits only where the losses read them: the LM head applied to the hidden states at marked positions.

The vocabulary projection is the widest matmul of a small model (SmolLM2: 576 x 49k per position, ~20% of its
forward FLOPs) and its [rows, L, V] output dominates training memory at 128k vocabularies and long rows. The losses
read few positions: the consistency terms n per state, the AR term the scored tokens of the AR input. So the module
marks those positions (`needed`, [R, L] bool), the LM head sees only their hidden states (a forward pre-hook, so
it runs inside the model's forward and FSDP2's all-gathers stay as they are), and the losses read logits through
`cllm.losses.take`, which works alike on full [R, L, V] logits and on the `LogitTable` this returns.

On CUDA with Liger-Kernel installed (the `gpu` extra), the AR term goes further: its cross-entropy is computed in
the same pre-hook from the hidden states and the head weight by Liger's fused linear cross-entropy, which never
materialises the AR positions' [T, V] logits (`FusedAR`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch


class LogitTable:
    """The logits of an [R, L] batch at some positions: `logits` [U, V] and `slots` [R, L] (row of `logits`, or -1)."""

    def __init__(self, logits: torch.Tensor, slots: torch.Tensor) -> None:
        self.logits, self.slots = logits, slots

    def __getitem__(self, rows: slice) -> LogitTable:
        """The table of some rows (`table[:B]`), like slicing full logits."""
        return LogitTable(self.logits, self.slots[rows])

    def detach(self) -> LogitTable:
        return LogitTable(self.logits.detach(), self.slots)

    def take(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """logits[rows, positions] (broadcast like tensor indexing): [..., V]."""
        slots = self.slots[rows, positions]
        if bool((slots < 0).any()):
            raise IndexError("the losses read logits at positions the LM head was not run on (not marked needed)")
        return self.logits[slots]


def needed_positions(shape: tuple[int, int], *requests: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """[R, L] bool, True at every (rows, positions) pair of the requests (index tensors that broadcast together)."""
    needed = torch.zeros(shape, dtype=torch.bool)
    for rows, positions in requests:
        needed[rows.cpu(), positions.cpu()] = True
    return needed


@dataclass
class FusedAR:
    """The AR term over (rows, positions) -> targets, computed inside the LM head's pre-hook (`loss` afterwards)."""

    rows: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    label_smoothing: float = 0.0
    loss: torch.Tensor | None = None


def fused_ce_available(device: torch.device) -> bool:
    """Whether Liger-Kernel's fused linear cross-entropy (Triton kernels, CUDA only) can run on `device`."""
    return device.type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def fused_linear_cross_entropy(
    weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> torch.Tensor:
    """mean_t CE(hidden_t @ weight.T, targets_t) (with label smoothing) without the [T, V] logits (Liger-Kernel)."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    return LigerFusedLinearCrossEntropyLoss(label_smoothing=label_smoothing)(weight, hidden, targets)


@contextmanager
def head_only_at(model: torch.nn.Module, needed: torch.Tensor, fused: FusedAR | None = None):
    """Inside, the model's LM head runs on the hidden states at `needed` only: the logits come out [1, U, V].
    With `fused`, its AR loss is computed there too (the head's weight is all-gathered inside the forward).

    Yields a function that turns those logits into a `LogitTable`.
    """
    flat = needed.flatten().nonzero().squeeze(1).to(next(model.parameters()).device)
    slots = torch.full((needed.numel(),), -1, dtype=torch.long, device=flat.device)
    slots[flat] = torch.arange(flat.numel(), device=flat.device)

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if fused is not None:
            selected = hidden[fused.rows, fused.positions]
            fused.loss = fused_linear_cross_entropy(module.weight, selected, fused.targets, fused.label_smoothing)
        return (hidden.reshape(-1, hidden.shape[-1])[flat][None],)

    def table(logits: torch.Tensor) -> LogitTable:
        return LogitTable(logits.reshape(-1, logits.shape[-1]), slots.view(needed.shape))

    handle = model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield table
    finally:
        handle.remove()


def sliced_forward(
    forward: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    needed: torch.Tensor | None,
    fused: FusedAR | None = None,
) -> torch.Tensor | LogitTable:
    """`forward()`'s logits: all of them when `needed` is None, else a `LogitTable` at the needed positions."""
    if needed is None:
        return forward()
    with head_only_at(model, needed, fused) as table:
        return table(forward())

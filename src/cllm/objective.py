"""Which losses a batch gets: a pure function of the loss options and the batch (no Lightning inside).

    loss = consistency_weight * L_c + ar_weight * L_ar        (the parts are in `cllm.losses`)

`batch_losses` picks the forward passes and the loss functions for an unpacked batch (`collate`), a packed one
(`collate_packed`: `segment_starts` in the batch) or Jacobi Forcing rows (`collate_forcing`: `pair_starts`; the
losses in `cllm.forcing_losses`), and which logits each loss reads (`reads`: only those are computed when the
model slices its LM head); `logits` is the model (`CLLMModule.logits`), so the choice tests with any callable that
returns logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cllm import forcing_losses, losses
from cllm.errors import UserError
from cllm.logit_table import FusedAR

CONSISTENCY_KINDS = ("global", "local")
AR_TARGETS = ("fixed_point", "labels")
Logits = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class LossOptions:
    """The loss settings of `CLLMModule` (see its docstring); checked on construction."""

    consistency: str = "global"
    divergence: str = "forward_kl"
    mask_before_mismatch: bool = False
    consistency_weight: float = 1.0
    ar_weight: float = 10.0
    ar_target: str = "fixed_point"
    ar_mask_prompt: bool = False
    label_smoothing: float = 0.0
    fused_ar: bool = False  # compute L_ar inside the LM head (Liger-Kernel, CUDA): set by the module where it runs

    def __post_init__(self) -> None:
        if self.consistency not in CONSISTENCY_KINDS:
            raise UserError(f"model.consistency must be one of {CONSISTENCY_KINDS}, not {self.consistency!r}")
        if self.divergence not in losses.DIVERGENCES:
            raise UserError(f"model.divergence must be one of {losses.DIVERGENCES}, not {self.divergence!r}")
        if self.ar_target not in AR_TARGETS:
            raise UserError(f"model.ar_target must be one of {AR_TARGETS}, not {self.ar_target!r}")
        for key in ("consistency_weight", "ar_weight"):
            if getattr(self, key) < 0:
                raise UserError(f"model.init_args.{key} must not be negative, not {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"model.init_args.label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.consistency_weight == 0 and self.ar_weight == 0:
            raise UserError("model.consistency_weight and model.ar_weight are both 0: nothing to train")


def batch_losses(
    logits: Logits, batch: dict[str, torch.Tensor], options: LossOptions, n: int
) -> dict[str, torch.Tensor]:
    """The loss parts of one batch (`loss`, `consistency_loss`, `ar_loss`), with as few forward passes as the
    options allow. `logits(input_ids, attention_mask, position_ids=None, *, reads, fused=None)` runs the model
    (`CLLMModule.logits`: a `LogitTable` at the (rows, positions) in `reads`, or all logits [B, L, V]).

    Global consistency with the AR loss on the fixed point needs ONE forward pass with grad, over the student
    input (ctx + s) and the AR input (ctx + y*) stacked into one batch of 2B rows. The global target
    p_θ⁻(·|ctx, y*) is the same model at the same weights on the same input as the AR pass, so the AR pass's
    logits, detached, are exactly the target: no separate no-grad pass is needed (the official trainer makes
    three passes: student, target, AR). Local consistency adds one no-grad pass over ctx + s'; AR on labels adds
    one pass with grad over the labels. Packed batches (`segment_starts` in the batch): `packed_batch_losses`.
    """
    if "segment_starts" in batch:
        return packed_batch_losses(logits, batch, options, n)
    if "pair_starts" in batch:
        return forcing_batch_losses(logits, batch, options, n)
    hp = options
    mask = batch["attention_mask"]
    use_consistency = hp.consistency_weight != 0
    use_ar = hp.ar_weight != 0
    ar_on_fixed_point = use_ar and hp.ar_target == "fixed_point"
    need_fixed_point = ar_on_fixed_point or (use_consistency and hp.consistency == "global")
    zero = batch["input_ids"].new_zeros((), dtype=torch.float32)

    grad_inputs = ([batch["input_ids"]] if use_consistency else []) + (
        [batch["fixed_point_ids"]] if need_fixed_point else []
    )
    rows = mask.shape[0]
    prompt_length = batch["prompt_length"] if hp.ar_mask_prompt else None
    blocks = block_reads(batch["block_start"], n)
    reads = [blocks] if use_consistency else []  # student rows first, then the fixed-point rows
    fused = None
    if need_fixed_point:
        offset = rows if use_consistency else 0
        if use_consistency and hp.consistency == "global":
            reads.append((blocks[0] + offset, blocks[1]))
        fused = fused_ar(batch["fixed_point_ids"], mask, prompt_length, hp, offset) if ar_on_fixed_point else None
        if ar_on_fixed_point and fused is None:
            ar_rows, ar_positions = ar_reads(batch["fixed_point_ids"], mask, prompt_length)
            reads.append((ar_rows + offset, ar_positions))
    table = None
    if grad_inputs:
        inputs, masks = torch.cat(grad_inputs), torch.cat([mask] * len(grad_inputs))
        table = logits(inputs, masks, reads=reads, fused=fused)
    student_logits = table[:rows] if use_consistency else None
    fixed_point_logits = table[-rows:] if need_fixed_point else None

    consistency = zero
    if use_consistency:
        if hp.consistency == "global":
            target_logits, target_ids = fixed_point_logits.detach(), batch["fixed_point_ids"]
        else:
            if "next_state_ids" not in batch:
                raise UserError("model.consistency=local needs next_state_ids: set data.init_args.next_state=true")
            with torch.no_grad():
                target_logits = logits(batch["next_state_ids"], mask, reads=[blocks])
            target_ids = batch["next_state_ids"]
        consistency = losses.consistency_loss(
            student_logits,
            target_logits,
            batch["block_start"],
            n,
            kind=hp.divergence,
            state_ids=batch["input_ids"],
            target_ids=target_ids,
            mask_before_mismatch=hp.mask_before_mismatch,
        )

    ar = zero
    if ar_on_fixed_point:
        ar = _ar_loss(fused, fixed_point_logits, batch["fixed_point_ids"], mask, prompt_length, hp)
    elif use_ar:
        if "labels_ids" not in batch:
            raise UserError("model.ar_target=labels needs labels_ids: set data.init_args.use_labels=true")
        labels, labels_mask = batch["labels_ids"], batch["labels_attention_mask"]
        labels_scored = labels_mask * (labels != -100)
        labels = labels.clamp(min=0)  # -100 padding is masked; clamp keeps ids valid
        fused = fused_ar(labels, labels_scored, prompt_length, hp)
        label_reads = [] if fused is not None else [ar_reads(labels, labels_scored, prompt_length)]
        label_logits = logits(labels, labels_mask, reads=label_reads, fused=fused)
        ar = _ar_loss(fused, label_logits, labels, labels_scored, prompt_length, hp)
    return loss_parts(consistency, ar, hp)


def packed_batch_losses(
    logits: Logits, batch: dict[str, torch.Tensor], options: LossOptions, n: int
) -> dict[str, torch.Tensor]:
    """The loss parts of packed rows ctx + y* + s_1 + ... + s_k (`collate_packed`), in ONE forward pass.

    Each segment sees only ctx and itself, at the positions it has unpacked, so the y* segment gives the AR
    logits and the global target, and each state segment a student: the same numbers as unpacked rows.
    """
    hp = options
    use_consistency, use_ar = hp.consistency_weight != 0, hp.ar_weight != 0
    check_one_pass(options, "packed batches (data.init_args.state_strategy: pack)")
    ids = batch["input_ids"]
    prompt_length = batch["prompt_length"] if hp.ar_mask_prompt else None
    reads = []
    if use_consistency:
        segment_rows, _, logit_positions = losses.packed_segments(batch["block_start"], batch["segment_starts"], n)
        reads += [block_reads(batch["block_start"], n), (segment_rows[:, None], logit_positions)]
    fused = fused_ar(ids, batch["fixed_point_mask"], prompt_length, hp) if use_ar else None
    if use_ar and fused is None:
        reads.append(ar_reads(ids, batch["fixed_point_mask"], prompt_length))
    table = logits(ids, batch["attention_mask"], batch["position_ids"], reads=reads, fused=fused)
    zero = ids.new_zeros((), dtype=torch.float32)
    consistency = zero
    if use_consistency:
        consistency = losses.packed_consistency_loss(
            table,
            ids,
            batch["block_start"],
            batch["segment_starts"],
            n,
            kind=hp.divergence,
            mask_before_mismatch=hp.mask_before_mismatch,
        )
    ar = zero
    if use_ar:
        ar = _ar_loss(fused, table, ids, batch["fixed_point_mask"], prompt_length, hp)  # the ctx + y* segment only
    return loss_parts(consistency, ar, hp)


def forcing_batch_losses(
    logits: Logits, batch: dict[str, torch.Tensor], options: LossOptions, n: int
) -> dict[str, torch.Tensor]:
    """Jacobi Forcing rows (`cllm.data_modules.jacobi_forcing`): every pair's consistency and the clean path's AR
    loss from ONE forward pass (`cllm.forcing_losses`)."""
    hp = options
    check_one_pass(options, "Jacobi Forcing batches (data.init_args.state_strategy: jacobi_forcing)")
    prompt_length = batch["prompt_length"] if hp.ar_mask_prompt else None
    reads = forcing_losses.forcing_reads(
        batch, n, consistency=hp.consistency_weight != 0, ar=hp.ar_weight != 0, prompt_length=prompt_length
    )
    table = logits(batch["input_ids"], batch["attention_mask"], batch["position_ids"], reads=reads)
    weights = {"consistency_weight": hp.consistency_weight, "ar_weight": hp.ar_weight}
    return forcing_losses.forcing_losses(
        table,
        batch,
        n,
        kind=hp.divergence,
        ar_mask_prompt=hp.ar_mask_prompt,
        label_smoothing=hp.label_smoothing,
        **weights,
    )


def _ar_loss(fused, logits, ids: torch.Tensor, mask: torch.Tensor, prompt_length, options: LossOptions) -> torch.Tensor:
    """L_ar: the fused cross-entropy's when the forward computed it (`fused_ar`), else from the logits."""
    if fused is not None:
        return fused.loss
    return losses.ar_loss(logits, ids, mask, prompt_length=prompt_length, label_smoothing=options.label_smoothing)


def loss_parts(consistency: torch.Tensor, ar: torch.Tensor, options: LossOptions) -> dict[str, torch.Tensor]:
    """loss = consistency_weight * L_c + ar_weight * L_ar, with its parts (what training logs)."""
    weights = {"consistency_weight": options.consistency_weight, "ar_weight": options.ar_weight}
    return {"loss": losses.total_loss(consistency, ar, **weights), "consistency_loss": consistency, "ar_loss": ar}


def check_one_pass(options: LossOptions, layout: str) -> None:
    """One-pass layouts hold the fixed points as the only targets: global consistency, AR on the fixed point."""
    if options.consistency_weight != 0 and options.consistency != "global":
        raise UserError(f"{layout} support model.consistency=global only, not {options.consistency!r}")
    if options.ar_weight != 0 and options.ar_target != "fixed_point":
        raise UserError(f"{layout} support model.ar_target=fixed_point only, not {options.ar_target!r}")


def block_reads(block_start: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [B, 1], positions [B, n]) of the logits that predict each row's block (`losses.block_logits`)."""
    return torch.arange(block_start.shape[0], device=block_start.device)[:, None], losses.block_positions(
        block_start, n
    )


def fused_ar(
    input_ids: torch.Tensor,
    scored: torch.Tensor,
    prompt_length: torch.Tensor | None,
    options: LossOptions,
    offset: int = 0,
) -> FusedAR | None:
    """The AR term to compute inside the LM head (`options.fused_ar`), else None: its logits are read instead."""
    if not options.fused_ar:
        return None
    rows, positions, targets = losses.scored_positions(losses.ar_labels(input_ids, scored, prompt_length))
    if targets.numel() == 0:
        return None
    return FusedAR(rows + offset, positions, targets, options.label_smoothing)


def ar_reads(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [T], positions [T]) of the logits `losses.ar_loss` scores."""
    rows, positions, _ = losses.scored_positions(losses.ar_labels(input_ids, attention_mask, prompt_length))
    return rows, positions

"""Jacobi Forcing losses (arXiv 2512.14681): pure functions over the logits of ONE pass over forcing rows.

Rows are `context | noisy_j fixed_j | ...` (`cllm.data_modules.jacobi_forcing`); both halves of pair j share
positions, so the logit at noisy_j[t] is p_θ(· | visible context, noisy_j[:t+1]) and the logit at fixed_j[t] is
p_θ(· | context, fixed blocks < j, fixed_j[:t+1]). Consistency, over kept (pair j, offset t):

    L_c = mean D( p_θ⁻(· | .., fixed_j[:t+1]) || p_θ(· | .., noisy_j[:t+1]) )     target detached

kept: t >= the first index where noisy_j differs from fixed_j (before it both condition on the same tokens of the
block), and t predicts a real token (in a block that holds an EOS, t < the EOS's index).
AR: next-token NLL on the clean path (context -> fixed_0 -> fixed_1 ...), labels built by the collate.
"""

from __future__ import annotations

import torch

from cllm.losses import divergence, labels_nll, scored_positions, take


def pair_positions(pair_starts: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The P real pairs of a batch: (row [P], noisy token positions [P, n], fixed token positions [P, n])."""
    rows, slots = (pair_starts >= 0).nonzero(as_tuple=True)
    noisy = pair_starts[rows, slots][:, None] + torch.arange(n, device=pair_starts.device)
    return rows, noisy, noisy + n


def kept_offsets(noisy_ids: torch.Tensor, fixed_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """[P, n] bool: offset t is kept iff noisy[:t+1] != fixed[:t+1] and t < scored (the logit at t predicts a real
    token: up to a block's EOS; a block without one keeps t = n - 1, which predicts the next block's first token)."""
    n = noisy_ids.shape[1]
    differs = (noisy_ids != fixed_ids).long().cumsum(-1) > 0
    offsets = torch.arange(n, device=noisy_ids.device)
    return differs & (offsets[None, :] < scored[:, None])


def pair_divergences(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    pair_starts: torch.Tensor,
    pair_scored: torch.Tensor,
    n: int,
    kind: str = "soft_ce",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-offset divergence [P, n], kept [P, n] bool) of every real pair, the fixed-point target detached."""
    rows, noisy, fixed = pair_positions(pair_starts, n)
    student = take(logits, rows[:, None], noisy)
    target = take(logits, rows[:, None], fixed).detach()
    keep = kept_offsets(input_ids[rows[:, None], noisy], input_ids[rows[:, None], fixed], pair_scored[pair_starts >= 0])
    return divergence(target, student, kind), keep


def kept_mean(per_offset: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """L_c from `pair_divergences`: mean over kept (pair, offset) of the batch; 0 (with a graph) when none is kept."""
    keep = keep.to(per_offset.dtype)
    return (per_offset * keep).sum() / keep.sum().clamp(min=1)


def forcing_ar_loss(
    logits: torch.Tensor,
    ar_labels: torch.Tensor,
    *,
    prompt_length: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """L_ar on the clean path; with `prompt_length`, prompt tokens are not targets (ar_mask_prompt)."""
    return labels_nll(logits, scored_labels(ar_labels, prompt_length), label_smoothing=label_smoothing)


def scored_labels(ar_labels: torch.Tensor, prompt_length: torch.Tensor | None) -> torch.Tensor:
    """The AR labels with the prompt's tokens no longer targets when `prompt_length` is given."""
    if prompt_length is None:
        return ar_labels
    positions = torch.arange(ar_labels.shape[1], device=ar_labels.device)
    return ar_labels.masked_fill(positions[None, :] < prompt_length.to(ar_labels.device)[:, None], -100)


def forcing_reads(
    batch: dict[str, torch.Tensor], n: int, *, consistency: bool, ar: bool, prompt_length: torch.Tensor | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, positions) of the logits the losses read: both halves of every real pair, the scored AR positions."""
    reads = []
    if consistency:
        rows, noisy, fixed = pair_positions(batch["pair_starts"], n)
        reads += [(rows[:, None], noisy), (rows[:, None], fixed)]
    if ar:
        rows, positions, _ = scored_positions(scored_labels(batch["ar_labels"], prompt_length))
        reads.append((rows, positions))
    return reads


def forcing_losses(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    n: int,
    *,
    kind: str = "soft_ce",
    consistency_weight: float = 1.0,
    ar_weight: float = 10.0,
    ar_mask_prompt: bool = False,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """loss = consistency_weight * L_c + ar_weight * L_ar of one forcing batch, with both parts apart."""
    zero = batch["input_ids"].new_zeros((), dtype=torch.float32)
    consistency = zero
    if consistency_weight != 0:
        divergences = pair_divergences(logits, batch["input_ids"], batch["pair_starts"], batch["pair_scored"], n, kind)
        consistency = kept_mean(*divergences)
    ar = zero
    if ar_weight != 0:
        prompt_length = batch["prompt_length"] if ar_mask_prompt else None
        ar = forcing_ar_loss(logits, batch["ar_labels"], prompt_length=prompt_length, label_smoothing=label_smoothing)
    total = consistency_weight * consistency + ar_weight * ar
    return {"loss": total, "consistency_loss": consistency, "ar_loss": ar}

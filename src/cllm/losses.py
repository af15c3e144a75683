"""CLLM training losses: pure functions, tensors in, scalar out (no Lightning inside).

Shapes: logits [B, L, V] from a causal LM over a right-padded batch; the Jacobi block of a row occupies
positions `block_start .. block_start + n - 1`. A causal LM's logit at position t predicts token t + 1, so the
prediction for block position i comes from the logit at position `block_start - 1 + i`.

Consistency (Kou et al. 2024, eq. 4 and 5), over block positions i = 0..n-1:

    L_global = mean_i D( p_θ⁻(· | ctx, y*[:i]) || p_θ(· | ctx, s[:i]) )     target detached (θ⁻ = stop-grad)
    L_local  = mean_i D( p_θ⁻(· | ctx, s'[:i]) || p_θ(· | ctx, s[:i]) )

Both are the same function here; only the target logits (from ctx + y* or from ctx + s') differ.

Packed rows (`ctx + y* + s_1 + ... + s_k`, each segment seeing ctx and itself only, positions restarting at
len(ctx)) hold the AR input and k student inputs of one record: `packed_consistency_loss` scores them all.

Logits are read only through `take`, so every loss takes either full [B, L, V] logits or a `LogitTable` holding
them at the positions it reads (`cllm.logit_table`); the float32 log-softmaxes run in chunks of `CHUNK` positions,
each recomputed in backward, so at most one chunk's float32 copies are alive at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DIVERGENCES = ("forward_kl", "soft_ce", "reverse_kl")
CHUNK = 4096  # positions per float32 log-softmax chunk


def take(logits, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits[rows, positions] -> [..., V], from full [B, L, V] logits or a `cllm.logit_table.LogitTable`."""
    return logits[rows, positions] if isinstance(logits, torch.Tensor) else logits.take(rows, positions)


def graph_zero(logits) -> torch.Tensor:
    """A 0 that keeps the logits' graph (a loss with nothing to score must not break backward)."""
    return (logits if isinstance(logits, torch.Tensor) else logits.logits).sum() * 0.0


def over_chunks(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """cat(fn(*pieces)) over chunks of `chunk` rows of the tensors; under grad each chunk is recomputed in backward."""
    count = tensors[0].shape[0]
    if count <= chunk:
        return fn(*tensors)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    parts = []
    for start in range(0, count, chunk):
        pieces = [t[start : start + chunk] for t in tensors]
        parts.append(checkpoint(fn, *pieces, use_reentrant=False) if recompute else fn(*pieces))
    return torch.cat(parts)


def block_positions(block_start: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] logit positions that predict the n block tokens of each row: block_start - 1 + i."""
    return block_start[:, None] - 1 + torch.arange(n, device=block_start.device)


def block_logits(logits, block_start: torch.Tensor, n: int) -> torch.Tensor:
    """The logits that predict the n block tokens of each row, [B, n, V]."""
    positions = block_positions(block_start, n)
    return take(logits, torch.arange(positions.shape[0], device=positions.device)[:, None], positions)


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits upcast to float32 for a stable log-softmax; float64 stays float64 (exact tests)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def divergence(target_logits: torch.Tensor, student_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence D(p_target || p_student) over the last (vocabulary) axis; shape = logits[..., 0].

    forward_kl:  Σ_v p_t (log p_t - log p_s)
    soft_ce:     -Σ_v p_t log p_s          (= forward KL + entropy of the target; same gradient in θ)
    reverse_kl:  Σ_v p_s (log p_s - log p_t)
    """
    shape, vocabulary = target_logits.shape[:-1], target_logits.shape[-1]
    flat_target, flat_student = target_logits.reshape(-1, vocabulary), student_logits.reshape(-1, vocabulary)
    return over_chunks(lambda t, s: _divergence(t, s, kind), flat_target, flat_student).reshape(shape)


def _divergence(target_logits: torch.Tensor, student_logits: torch.Tensor, kind: str) -> torch.Tensor:
    log_target = F.log_softmax(at_least_float32(target_logits), dim=-1)
    log_student = F.log_softmax(at_least_float32(student_logits), dim=-1)
    if kind == "forward_kl":
        return (log_target.exp() * (log_target - log_student)).sum(-1)
    if kind == "soft_ce":
        return -(log_target.exp() * log_student).sum(-1)
    if kind == "reverse_kl":
        return (log_student.exp() * (log_student - log_target)).sum(-1)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {DIVERGENCES}")


def positions_after_first_mismatch(state: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, n] bool: block position i is kept iff state[:i] != target[:i] (some earlier block token differs).

    The prediction at position i sees block tokens 0..i-1; while they equal the target's, student and target
    condition on the same input, so the divergence is exactly 0 and only dilutes the mean (official trick).
    """
    differs = (state != target).long()
    seen_mismatch = differs.cumsum(-1) > 0  # [B, n]: a mismatch at or before j
    # position i sees tokens < i: shift right by one
    return torch.cat([torch.zeros_like(seen_mismatch[:, :1]), seen_mismatch[:, :-1]], dim=1)


def consistency_loss(
    student_logits: torch.Tensor,
    target_logits: torch.Tensor,
    block_start: torch.Tensor,
    n: int,
    *,
    kind: str = "forward_kl",
    state_ids: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    mask_before_mismatch: bool = False,
) -> torch.Tensor:
    """L_c = mean over kept (row, block position) of D(p_target || p_student); the target is detached here.

    Args:
        student_logits: [B, L, V] of the model on ctx + s (with grad).
        target_logits: [B, L, V] of the model on ctx + y* (global) or ctx + s' (local).
        block_start: [B] first block position of each row.
        n: block size.
        kind: one of DIVERGENCES.
        state_ids, target_ids: [B, L] inputs of student and target; needed for `mask_before_mismatch`.
        mask_before_mismatch: keep only block positions whose input prefix differs from the target's.
    """
    student = block_logits(student_logits, block_start, n)
    target = block_logits(target_logits, block_start, n)
    if not mask_before_mismatch:
        return mean_block_divergence(student, target, kind)
    if state_ids is None or target_ids is None:
        raise ValueError("mask_before_mismatch needs state_ids and target_ids")
    state_tokens, target_tokens = _block_ids(state_ids, block_start, n), _block_ids(target_ids, block_start, n)
    return mean_block_divergence(student, target, kind, state_tokens=state_tokens, target_tokens=target_tokens)


def mean_block_divergence(
    student: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    *,
    state_tokens: torch.Tensor | None = None,
    target_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """mean over kept (sample, block position) of D(p_target || p_student), target detached.

    Args:
        student, target: [S, n, V] logits predicting the n block tokens of S samples.
        kind: one of DIVERGENCES.
        state_tokens, target_tokens: [S, n] block tokens; given, positions before the first mismatch are dropped.
    """
    per_position = divergence(target.detach(), student, kind)  # [S, n]
    if state_tokens is None:
        return per_position.mean()
    keep = positions_after_first_mismatch(state_tokens, target_tokens).to(per_position.dtype)
    # An all-masked batch (every state already equal to its target) contributes 0, not NaN.
    return (per_position * keep).sum() / keep.sum().clamp(min=1)


def packed_segments(
    block_start: torch.Tensor, segment_starts: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the S real state segments of packed rows are: (row [S], token positions [S, n], logit positions [S, n]).

    Block token 0 of every segment is predicted by the last context token (shared by all segments of a row),
    token i > 0 by the segment's own position i - 1: logit positions = [block_start - 1, start, ..., start + n - 2].
    Padded segments (start -1) are left out.
    """
    rows, slots = (segment_starts >= 0).nonzero(as_tuple=True)
    starts = segment_starts[rows, slots]
    token_positions = starts[:, None] + torch.arange(n, device=starts.device)
    logit_positions = torch.cat([block_start.to(starts.device)[rows, None] - 1, token_positions[:, :-1]], dim=1)
    return rows, token_positions, logit_positions


def packed_consistency_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    block_start: torch.Tensor,
    segment_starts: torch.Tensor,
    n: int,
    *,
    kind: str = "forward_kl",
    mask_before_mismatch: bool = False,
) -> torch.Tensor:
    """Global L_c of packed rows: mean over real (state, block position) of D(p_θ⁻(·|ctx, y*[:i]) || p_θ(·|ctx, s[:i])).

    Equals `consistency_loss` over one unpacked row per state. The target is the row's own fixed-point segment.

    Args:
        logits: [B, L, V] of the model on the packed rows.
        input_ids: [B, L] packed rows ctx + y* + s_1 + ... + s_k.
        block_start: [B] context length (start of y*).
        segment_starts: [B, k] start of each state segment, -1 for a padded segment.
        n: block size.
        kind: one of DIVERGENCES.
        mask_before_mismatch: keep only block positions whose input prefix differs from y*'s.
    """
    rows, token_positions, logit_positions = packed_segments(block_start, segment_starts, n)
    student = take(logits, rows[:, None], logit_positions)  # [S, n, V]
    target = block_logits(logits, block_start, n)[rows]
    if not mask_before_mismatch:
        return mean_block_divergence(student, target, kind)
    state_tokens = input_ids[rows[:, None], token_positions]
    target_tokens = _block_ids(input_ids, block_start, n)[rows]
    return mean_block_divergence(student, target, kind, state_tokens=state_tokens, target_tokens=target_tokens)


def _block_ids(ids: torch.Tensor, block_start: torch.Tensor, n: int) -> torch.Tensor:
    positions = block_start.to(ids.device)[:, None] + torch.arange(n, device=ids.device)
    return ids.gather(1, positions)


def ar_loss(
    logits,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    prompt_length: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """L_ar = mean over target tokens t of -[(1-ε) log p(x_t | x_<t) + ε/V Σ_v log p(v | x_<t)].

    Targets are the tokens 1..L-1 of each row where the attention mask is 1, excluding the first
    `prompt_length` tokens when it is given (prompt masked); ε = label_smoothing.
    """
    return labels_nll(logits, ar_labels(input_ids, attention_mask, prompt_length), label_smoothing=label_smoothing)


def ar_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: torch.Tensor | None = None
) -> torch.Tensor:
    """The AR targets of `ar_loss`: input_ids, -100 where the mask is 0 and, given `prompt_length`, on the prompt."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if prompt_length is not None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        labels = labels.masked_fill(positions[None, :] < prompt_length.to(input_ids.device)[:, None], -100)
    return labels


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows [T], logit positions [T], targets [T]) of shifted labels: the logit at t predicts labels[t + 1] != -100."""
    rows, positions = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    return rows, positions, labels[rows, positions + 1]


def labels_nll(logits, labels: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """Shifted token NLL (ignore index -100): the logit at t is scored against labels[t + 1]."""
    rows, positions, targets = scored_positions(labels)
    if targets.numel() == 0:
        return graph_zero(logits)  # nothing to score (keeps the graph, no NaN)
    return token_nll(take(logits, rows, positions), targets, label_smoothing=label_smoothing)


def token_nll(logits: torch.Tensor, targets: torch.Tensor, *, label_smoothing: float = 0.0) -> torch.Tensor:
    """mean_t -[(1-ε) log p(targets_t) + ε/V Σ_v log p(v)] of [T, V] logits, in float32 chunks."""

    def per_token(chunk_logits: torch.Tensor, chunk_targets: torch.Tensor) -> torch.Tensor:
        smoothing = label_smoothing
        return F.cross_entropy(
            at_least_float32(chunk_logits), chunk_targets, label_smoothing=smoothing, reduction="none"
        )

    return over_chunks(per_token, logits, targets).sum() / targets.numel()


def total_loss(
    consistency: torch.Tensor, ar: torch.Tensor, *, consistency_weight: float = 1.0, ar_weight: float = 10.0
) -> torch.Tensor:
    """loss = consistency_weight * L_c + ar_weight * L_ar (official CLLM default 1 : 10)."""
    return consistency_weight * consistency + ar_weight * ar

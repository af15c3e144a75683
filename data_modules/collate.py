"""Collation: samples of the trajectory stream -> the batch tensors `CLLMModule` reads (the batch contract).

`collate` (one state per row) gives, per row, the context ctx (truncated from the left to max_length - n tokens)
followed by the n block tokens, right-padded, all sharing one attention mask:

    input_ids        ctx + s       (the student input; s a non-final state)
    fixed_point_ids  ctx + y*      (the AR input and the global consistency target)
    attention_mask   1 on ctx + n block tokens
    block_start      len(ctx)      (the block occupies block_start .. block_start + n - 1)
    prompt_length    prompt tokens left in ctx (AR loss with the prompt masked)
    next_state_ids   ctx + s'      (with next_state: local consistency)
    labels_ids, labels_attention_mask   prompt + ground-truth answer (with use_labels; -100 padding)

`collate_packed` (state_strategy `pack`) gives one row per record, ctx + y* + s_1 + ... + s_k, with a 4D may-attend
mask, per-token positions and `segment_starts` (see docs/data.md).
"""

from __future__ import annotations

import torch

from cllm.errors import UserError


def truncated_contexts(samples: list[dict], n: int, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Each sample's context cut to the last max_length - n tokens, and the prompt tokens left in it."""
    keep = max_length - n  # context budget: over-long contexts lose their oldest tokens
    contexts, prompt_lengths = [], []
    for sample in samples:
        record = sample["record"]
        context = record.context
        cut = max(len(context) - keep, 0)
        contexts.append(context[cut:])
        prompt_lengths.append(max(len(record.prompt_ids) - cut, 0))
    return contexts, prompt_lengths


def padded(rows: list[list[int]], fill: int, size: int) -> torch.Tensor:
    """[len(rows), size] long tensor, each row right-padded with `fill`."""
    return torch.tensor([row + [fill] * (size - len(row)) for row in rows], dtype=torch.long)


def collate(samples: list[dict], *, pad_id: int, n: int, max_length: int, next_state: bool, use_labels: bool) -> dict:
    """Right-padded batch sharing one attention mask (see docs/data.md for the contract)."""
    contexts, prompt_lengths = truncated_contexts(samples, n, max_length)
    width = max(len(c) for c in contexts) + n
    batch = {
        "input_ids": padded([c + s["state"] for c, s in zip(contexts, samples)], pad_id, width),
        "fixed_point_ids": padded([c + s["record"].fixed_point for c, s in zip(contexts, samples)], pad_id, width),
        "attention_mask": padded([[1] * (len(c) + n) for c in contexts], 0, width),
        "block_start": torch.tensor([len(c) for c in contexts], dtype=torch.long),
        "prompt_length": torch.tensor(prompt_lengths, dtype=torch.long),
    }
    if next_state:
        batch["next_state_ids"] = padded([c + s["next_state"] for c, s in zip(contexts, samples)], pad_id, width)
    if use_labels:
        labels = []
        for sample in samples:
            record = sample["record"]
            if record.labels is None:
                raise UserError(f"use_labels is on but record {record.prompt_id!r} block {record.block_index} has none")
            labels.append((record.prompt_ids + record.labels)[-max_length:])
        span = max(len(label) for label in labels)
        batch["labels_ids"] = padded(labels, -100, span)
        batch["labels_attention_mask"] = padded([[1] * len(label) for label in labels], 0, span)
    return batch


def collate_packed(samples: list[dict], *, pad_id: int, n: int, max_length: int) -> dict:
    """One row per record: ctx + y* + s_1 + ... + s_k, each segment attending to ctx and causally to itself only.

    Positions restart at len(ctx) for y* and for every state, so each segment sees exactly what it sees unpacked.
    The context keeps the unpacked budget of max_length - n tokens (rows may be longer than max_length).
    Segment ids: 0 context, 1 fixed point, 1 + j state j, -1 padding; padding keys are seen by no real token.
    """
    contexts, prompt_lengths = truncated_contexts(samples, n, max_length)
    most_states = max(len(sample["states"]) for sample in samples)
    rows, positions, segments, segment_starts = [], [], [], []
    for context, sample in zip(contexts, samples):
        parts = [sample["record"].fixed_point, *sample["states"]]
        rows.append(context + [token for part in parts for token in part])
        block_positions = list(range(len(context), len(context) + n))
        positions.append(list(range(len(context))) + block_positions * len(parts))
        segments.append([0] * len(context) + [1 + j for j in range(len(parts)) for _ in range(n)])
        starts = [len(context) + n * j for j in range(1, len(parts))]
        segment_starts.append(starts + [-1] * (most_states - len(starts)))
    width = max(len(row) for row in rows)
    segment = padded(segments, -1, width)
    query_segment, key_segment = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # may attend[b, q, k] = k <= q and (k in the context or k in q's own segment)
    may_attend = causal & ((key_segment == 0) | (key_segment == query_segment))
    return {
        "input_ids": padded(rows, pad_id, width),
        "position_ids": padded(positions, 0, width),
        "attention_mask": may_attend[:, None],
        "fixed_point_mask": padded([[1] * (len(c) + n) for c in contexts], 0, width),
        "block_start": torch.tensor([len(c) for c in contexts], dtype=torch.long),
        "segment_starts": torch.tensor(segment_starts, dtype=torch.long),
        "prompt_length": torch.tensor(prompt_lengths, dtype=torch.long),
    }

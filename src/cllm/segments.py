"""The pieces of one verification pass, shared by the batched decoders (`cllm.decoders`) and the serving engine
(`cllm.serve_engine`): fresh guesses, the acceptance length, several segments packed side by side in one forward
pass under a 4D mask (each causal on its own), and keeping only the winners' slots in the KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache

from cllm.jacobi import DecodeOptions, initial_guess


def accepted_length(x: list[int], q: list[int]) -> int:
    """a = 1 + leading run of i >= 1 with x[i] == q[i-1]."""
    run = 1
    while run < len(x) and x[run] == q[run - 1]:
        run += 1
    return run


def fresh_guesses(
    prompts: Sequence[torch.Tensor], count: int, options: DecodeOptions, generator: torch.Generator
) -> torch.Tensor:
    """`initial_guess`, with `repeat` drawn as padding (it draws nothing) and filled in by `guess_row`."""
    strategy = "pad" if options.init == "repeat" else options.init
    return initial_guess(prompts, count, strategy, options.pad_token_id, generator)


def guess_row(fresh: torch.Tensor, first: int, init: str) -> list[int]:
    """Fresh guesses for one row (the `repeat` strategy repeats the known-correct token)."""
    return [first] * len(fresh) if init == "repeat" else fresh.tolist()


def pack_segments(
    segments: list[list[list[int]]], attention_mask: torch.Tensor, next_position: torch.Tensor, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[tuple[int, int]]]]:
    """Lay each row's segments side by side: ids, logical positions, a boolean mask [rows, 1, Q, cache + Q]
    (cache slots as `attention_mask`; causal inside each segment, nothing across), each segment's (start, length).
    """
    width = max(sum(len(s) for s in row) for row in segments)
    rows = len(segments)
    ids = torch.full((rows, width), pad_token_id, dtype=torch.long)
    positions = next_position[:, None].repeat(1, width)
    segment_of = torch.full((rows, width), -1, dtype=torch.long)
    index_in = torch.zeros((rows, width), dtype=torch.long)
    offsets = []
    for r, row in enumerate(segments):
        start, spans = 0, []
        for s, segment in enumerate(row):
            span = slice(start, start + len(segment))
            ids[r, span] = torch.tensor(segment)
            index_in[r, span] = torch.arange(len(segment))
            segment_of[r, span] = s
            spans.append((start, len(segment)))
            start += len(segment)
        offsets.append(spans)
    positions = positions + index_in
    same = segment_of[:, :, None] == segment_of[:, None, :]
    causal = index_in[:, None, :] <= index_in[:, :, None]
    new = same & causal & (segment_of[:, :, None] >= 0)
    new |= torch.eye(width, dtype=torch.bool)  # padding queries see themselves (no empty softmax rows)
    old = attention_mask.bool()[:, None, :].expand(rows, width, -1)
    return ids, positions, torch.cat([old, new], dim=-1)[:, None], offsets


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep-mask -> additive float mask (0 where kept, the dtype's minimum elsewhere)."""
    return torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)


def keep_winners(
    cache: DynamicCache, attention_mask: torch.Tensor, slots: list[list[int]], lengths: list[int], device
) -> torch.Tensor:
    """Keep, per row, only the pass's cache slots in `slots` (relative to the pass), right-padded to the longest
    with masked holes; return the attention mask over the cache slots that remain."""
    past = attention_mask.shape[1]
    longest = max(lengths)
    kept = (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).long()
    if all(s[0] == 0 for s in slots):  # every winner is the window itself: crop, as `jacobi` does (no copy)
        cache.crop(past + longest - cache.get_seq_length())
        return torch.cat([attention_mask, kept], dim=1)
    index = torch.tensor([s + [s[-1]] * (longest - len(s)) for s in slots], dtype=torch.long, device=device)
    for layer in cache.layers:
        for name in ("keys", "values"):
            states = getattr(layer, name)
            gather = index[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
            setattr(layer, name, torch.cat([states[:, :, :past], states[:, :, past:].gather(2, gather)], dim=2))
    return torch.cat([attention_mask, kept], dim=1)

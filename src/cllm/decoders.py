"""Decoders beyond one Jacobi block, all lossless against greedy AR, and the one batched-decode helper.

- `jacobi`: one n-token block per pass (`cllm.jacobi.jacobi_generate`).
- `multiblock`: up to K blocks in flight. The window holds block 1 (the one being committed) and draft blocks
  after it, refined in the same causal pass (a draft attends to block 1's current state). When the share of
  block 1's tokens that are *settled* (unchanged by the last pass: `b[i] == q[i-1]`) reaches r, the window grows
  by one block (up to K); when it falls below r, the window shrinks by one. The window slides as tokens commit,
  so a refined draft is promoted to block 1 with its state. With K = 1 this is exactly `jacobi`.
- `recycle`: rejection recycling. Each row keeps an n-gram pool keyed by first token (its prompt's n-grams, then
  every pass's window, rejected tokens included). Each pass also verifies up to G pool n-grams that start with
  the next known-correct token, as extra segments of the same forward pass (a 4D mask keeps every segment causal
  on its own, lookahead-style); the longest verified run is committed.
- `multiblock+recycle`: both (Jacobi Forcing's "MR").

`DECODERS` names them all; each takes the shared `cllm.jacobi.DecodeOptions` and its own settings as keywords
(`DECODER_OPTIONS`). `decode_batched` (bench, the accepted-tokens callback and the headline) runs any of them over a
prompt list in batches.

The acceptance rule is the same for every segment s (tokens `x`, predictions `q`, first token known correct):
`a_s = 1 + max{k : x[i] == q[i-1] for 1 <= i <= k}`; the winner commits `x[:a]` and `q[a-1]` becomes the next
known-correct token, so each pass commits >= 1 token of greedy AR's output. The KV cache keeps the winner's
accepted slots only (rectangular over the batch, holes masked, logical positions as in `cllm.jacobi`). `jacobi` and
`multiblock` also sample, exactly: the predictions are `cllm.sampled_jacobi.redraft` draws, the rule unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch

from cllm.jacobi import (
    DecodeOptions,
    JacobiResult,
    Prompts,
    _finish_lockstep,
    _keep_going,
    cache_argument,
    commit,
    jacobi_generate,
    prefill,
)
from cllm.ngram_pool import NGramPool, seeded_pools
from cllm.prefill import greedy_pick
from cllm.sampled_jacobi import SampledWindowRule
from cllm.sampling import SamplingSettings, sampled_decoder
from cllm.segments import accepted_length, additive_mask, fresh_guesses, guess_row, keep_winners, pack_segments

DEFAULT_BLOCKS = 2  # K: blocks in flight for multiblock
DEFAULT_THRESHOLD = 0.5  # r: settled share of block 1 that starts a draft block
DEFAULT_CANDIDATES = 2  # G: pool n-grams verified per pass for recycle
DEFAULT_POOL_SIZE = 8  # n-grams kept per first token and row (most recent first)


@dataclass
class MultiblockResult(JacobiResult):
    """`JacobiResult` plus, per row, the passes won by a recycled n-gram and the blocks in flight at each pass."""

    recycled_passes: list[int] = field(default_factory=list)
    window_blocks: list[list[int]] = field(default_factory=list)


@torch.no_grad()
def multiblock_generate(
    model: torch.nn.Module,
    prompts: Prompts,
    options: DecodeOptions,
    *,
    blocks: int = DEFAULT_BLOCKS,
    threshold: float = DEFAULT_THRESHOLD,
    candidates: int = DEFAULT_CANDIDATES,
    pool_size: int = DEFAULT_POOL_SIZE,
    ngram: int | None = None,
    ngrams: Sequence[Sequence[int]] = (),
    rule: SampledWindowRule | None = None,
) -> MultiblockResult:
    """Greedy decoding with up to `blocks` Jacobi blocks in flight and `candidates` recycled n-grams per pass.

    Args:
        model, prompts, options: as `jacobi_generate`.
        blocks: K, the most blocks in flight (1: single-block Jacobi).
        threshold: r, the settled share of block 1 at which one more block is drafted.
        candidates: G, pool n-grams verified per pass (0: no recycling).
        pool_size: n-grams kept per first token and row.
        ngram: n-gram length of the pool (default n).
        ngrams: extra n-grams planted in every row's pool (after its prompt's).
        rule: sampled decoding (`cllm.sampled_jacobi.SampledWindowRule`; candidates must be 0); default greedy.
    """
    if rule is not None and candidates:
        raise ValueError("sampled multiblock verifies no recycled candidates (candidates must be 0)")
    if blocks < 1 or candidates < 0 or pool_size < 1 or not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"need blocks >= 1, candidates >= 0, pool_size >= 1, 0 <= r <= 1; got "
            f"blocks={blocks} candidates={candidates} pool_size={pool_size} threshold={threshold}"
        )
    n, init, pad_token_id, all_done = options.n, options.init, options.pad_token_id, options.all_done
    ngram = ngram or n
    device = next(model.parameters()).device
    generator = options.generator()
    batch = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    accepted_per_pass: list[list[int]] = [[] for _ in range(batch)]
    recycled: list[int] = [0] * batch  # passes whose longest run came from the pool
    window_blocks: list[list[int]] = [[] for _ in range(batch)]
    result = MultiblockResult(tokens, accepted_per_pass, n, recycled, window_blocks)
    if batch == 0 or options.max_new_tokens <= 0:
        _finish_lockstep(model, all_done, pad_token_id, device)
        return result
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")

    prompt_tensors = [torch.as_tensor(list(prompt), dtype=torch.long) for prompt in prompts]
    pick = greedy_pick if rule is None else rule.first
    cache, attention_mask, next_position, known = prefill(model, prompt_tensors, pad_token_id, pick)
    if candidates:
        pools = seeded_pools(prompts, ngram, pool_size, ngrams)
    else:  # asked for no candidates and never filled
        pools = [NGramPool(ngram, pool_size) for _ in range(batch)]
    # Each row's window: a list of token ids, its first token known correct; its length is n * (blocks in flight).
    guesses = fresh_guesses(prompt_tensors, n - 1, options, generator)
    windows = [[int(known[i])] + guess_row(guesses[i], int(known[i]), init) for i in range(batch)]
    in_flight = [1] * batch
    rows = list(range(batch))  # original index of each active row

    while _keep_going(bool(rows), all_done):
        if not rows:
            model(input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device))
            continue
        # Segments of each row: its window, then up to G pool n-grams starting with the known-correct token.
        segments = [
            [windows[i]] + [list(g) for g in pools[row].candidates(windows[i][0], candidates, windows[i])]
            for i, row in enumerate(rows)
        ]
        input_ids, position_ids, mask, offsets = pack_segments(segments, attention_mask, next_position, pad_token_id)
        out = model(
            input_ids=input_ids.to(device),
            attention_mask=additive_mask(mask, out_dtype(model)).to(device),
            position_ids=position_ids.to(device),
            use_cache=True,
            **cache_argument(model, cache),
        )
        predictions = out.logits.argmax(-1).cpu().tolist() if rule is None else rule.predictions(out.logits, windows)
        ids = input_ids.tolist()

        keep_slots, keep_lengths, finished = [], [], []
        for i, row in enumerate(rows):
            runs = []
            for start, length in offsets[i]:
                x, q = ids[i][start : start + length], predictions[i][start : start + length]
                runs.append((accepted_length(x, q), start, length))
            best = max(range(len(runs)), key=lambda s: (runs[s][0], -s))  # ties: the window (Jacobi state) wins
            accepted, start, length = runs[best]
            recycled[row] += best > 0
            window, window_predictions = windows[i], predictions[i][: len(windows[i])]
            winner_predictions = predictions[i][start : start + length]

            proposed = ids[i][start : start + accepted]
            done = commit(tokens[row], accepted_per_pass[row], proposed, options)
            window_blocks[row].append(in_flight[i])
            keep_slots.append(list(range(start, start + accepted)))
            keep_lengths.append(accepted)
            # Fresh guesses are drawn for every row, finishing or not, in row order (the stream `jacobi` draws).
            width = n * in_flight[i]
            draws = fresh_guesses([prompt_tensors[row]], width - 1, options, generator)[0]
            if done:
                finished.append(i)
                continue
            if candidates:
                pools[row].add_all(window + window_predictions[-1:], range(len(window)))
            # Blocks in flight next pass: grow while block 1 is settling, shrink when it is not.
            settled = 1 + sum(window[k] == window_predictions[k - 1] for k in range(1, min(n, len(window))))
            grow = settled >= threshold * n
            grown = max(1, min(blocks, in_flight[i] + (1 if grow else -1)))
            if grown > in_flight[i]:
                more = fresh_guesses([prompt_tensors[row]], n * (grown - in_flight[i]), options, generator)
                draws = torch.cat([draws, more[0]])
            in_flight[i], width = grown, n * grown
            # Next window: the winner's predictions from q[a-1] on, then the window's, then fresh guesses.
            merged = winner_predictions + window_predictions[length:]
            carried = merged[accepted - 1 : accepted - 1 + width]
            windows[i] = carried + guess_row(draws[len(carried) - 1 : width - 1], carried[0], init)
            if rule is not None:
                rule.carry(i, accepted, windows[i])

        attention_mask = keep_winners(cache, attention_mask, keep_slots, keep_lengths, device)
        next_position = next_position + torch.tensor(keep_lengths)
        if finished:
            keep = sorted(set(range(len(rows))) - set(finished))
            if rule is not None:
                rule.keep(keep)
            rows, windows, in_flight = [rows[i] for i in keep], [windows[i] for i in keep], [in_flight[i] for i in keep]
            if rows:
                keep_index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(keep_index.to(device))
                attention_mask, next_position = attention_mask[keep_index], next_position[keep_index]
    return result


def out_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


Decoder = Callable[..., JacobiResult]
# name -> decoder called as (model, prompts, options: DecodeOptions, **its own settings), like jacobi_generate
DECODERS: dict[str, Decoder] = {
    "jacobi": jacobi_generate,
    "multiblock": partial(multiblock_generate, candidates=0),
    "recycle": partial(multiblock_generate, blocks=1),
    "multiblock+recycle": multiblock_generate,
}
# the settings each named decoder takes beyond DecodeOptions
DECODER_OPTIONS: dict[str, tuple[str, ...]] = {
    "jacobi": (),
    "multiblock": ("blocks", "threshold"),
    "recycle": ("candidates", "pool_size", "ngram"),
    "multiblock+recycle": ("blocks", "threshold", "candidates", "pool_size", "ngram"),
}


def decode_batched(
    model: torch.nn.Module,
    prompts: Prompts,
    *,
    batch_size: int,
    decoder: str | Decoder = "jacobi",
    min_batches: int = 0,
    options: DecodeOptions | None = None,
    decoder_options: dict | None = None,
    sampling: SamplingSettings | None = None,
    **fields,
) -> JacobiResult:
    """Decode `prompts` in batches of `batch_size` with one decoder and merge the results in prompt order.

    Args:
        model: the causal LM.
        prompts: token id lists.
        batch_size: rows per decoder call.
        decoder: a name in DECODERS or a callable called like them.
        min_batches: walk at least this many batches (the last ones empty): distributed callers pass the same
            count on every rank so that, with `all_done`, every rank makes the same forward passes.
        options: the settings every decoder takes (default: `DecodeOptions()`).
        decoder_options: the decoder's own settings (blocks, threshold, candidates, pool_size, ngram); a named
            decoder gets only those it takes (see DECODER_OPTIONS), so one dict serves every decoder.
        sampling: draw tokens (`cllm.sampling`; a decoder by name, refused where it cannot sample exactly);
            None or temperature 0: greedy.
        fields: `DecodeOptions` fields that replace those of `options`, so keyword callers need not build one
            (`decode_batched(model, prompts, batch_size=8, n=16, max_new_tokens=64, eos_token_id=2)`).
    """
    options = replace(options or DecodeOptions(), **fields)
    own = dict(decoder_options or {})
    if isinstance(decoder, str):
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
        own = {k: v for k, v in own.items() if k in DECODER_OPTIONS[decoder]}
        greedy = sampling is None or sampling.greedy
        decoder = DECODERS[decoder] if greedy else sampled_decoder(decoder, DECODERS[decoder], sampling, model)
    elif sampling is not None and not sampling.greedy:
        raise ValueError("sampled decoding takes a decoder by name (see cllm.sampling.SAMPLED_DECODERS)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = max(math.ceil(len(prompts) / batch_size), min_batches)
    results = [decoder(model, prompts[b * batch_size : (b + 1) * batch_size], options, **own) for b in range(batches)]
    return JacobiResult.concat(results, options.n)

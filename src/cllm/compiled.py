"""The fast path (`--compile`): a static KV cache and a `torch.compile`d fixed-shape step, for greedy AR, Jacobi and
rejection recycling.

Every decode pass has the same shape ([batch, 1] for AR, [batch, n] for Jacobi) against a preallocated cache of
`max_len` slots, so the compiled graph is built once per (model, batch, max_len, width) and reused across prompts.
Slots are physical: a Jacobi pass writes its n slots at the write pointer s, keeps the first `longest` of them
(s += longest, the rest is overwritten next pass) and masks each row's rejected slots ("holes"), exactly as the
dynamic-cache decoder does; positions stay logical. Finished rows stay in the batch (the shape is fixed) and are
ignored. The mask is a 4D additive mask built outside the compiled region, so no shape ever changes inside it.

Recycling (`static_recycle_generate`) packs the window and up to G pool n-grams side by side in a pass of fixed
width n + G * ngram (segments missing from the pool are padding, masked); when a recycled n-gram wins, its accepted
slots are copied down to the write pointer before it advances, so the cache holds the committed tokens in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from transformers import StaticCache

from cllm.decoders import DEFAULT_CANDIDATES, DEFAULT_POOL_SIZE, MultiblockResult
from cllm.hardware import capped_inductor_cache
from cllm.jacobi import (
    DecodeOptions,
    JacobiResult,
    Prompts,
    _as_set,
    _fill_block,
    cache_argument,
    commit,
    jacobi_step,
    left_pad,
)
from cllm.ngram_pool import seeded_pools
from cllm.segments import accepted_length, additive_mask, fresh_guesses, guess_row, pack_segments

SLOT_ROUNDING = 128  # max_len is rounded up to a multiple of this, so prompts of similar length share one graph


class StaticRunner:
    """One model, one preallocated cache, one (optionally compiled) step that returns the argmax predictions."""

    def __init__(self, model: torch.nn.Module, max_len: int, compile: bool) -> None:
        self.model, self.max_len = model, max_len
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        if compile:  # caps set by hand get a kernel cache of their own too (see capped_inductor_cache)
            os.environ.update(capped_inductor_cache())
        self.step = torch.compile(self._forward, dynamic=False) if compile else self._forward

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=mask,
            use_cache=True,
            **cache_argument(self.model, self.cache),
        )
        return out.logits.argmax(-1)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Eager pass over the left-padded prompts (shapes vary, so it is not compiled); first predictions."""
        self.cache.reset()
        valid = torch.zeros((len(input_ids), self.max_len), dtype=torch.bool)
        valid[:, : input_ids.shape[1]] = attention_mask.bool()
        out = self.model(
            input_ids=input_ids.to(self.device),
            position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(self.device),
            attention_mask=self.mask(valid, 0, input_ids.shape[1]),
            use_cache=True,
            logits_to_keep=1,
            **cache_argument(self.model, self.cache),
        )
        return out.logits[:, -1].argmax(-1).cpu()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def mask(self, valid: torch.Tensor, start: int, width: int) -> torch.Tensor:
        """[rows, 1, width, max_len] additive mask: query i (slot start + i) sees the valid slots up to its own."""
        slots = torch.arange(self.max_len)
        allowed = valid[:, None, :] & (slots[None, None, :] <= start + torch.arange(width)[None, :, None])
        return self.additive(allowed[:, None])

    def additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """Boolean [rows, 1, width, max_len] keep-mask -> the additive mask of the model's dtype, on its device."""
        return additive_mask(allowed, next(self.model.parameters()).dtype).to(self.device)

    def run(self, block: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, start: int) -> torch.Tensor:
        """One pass over `block` written at slots start.. (marked valid here; the caller masks the rejected)."""
        valid[:, start : start + block.shape[1]] = True
        mask = self.mask(valid, start, block.shape[1])
        return self.step(block.to(self.device), positions.to(self.device), mask).cpu()

    def run_masked(self, ids: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """One pass over `ids` written at the cache's pointer, under the boolean keep-mask `allowed`."""
        return self.step(ids.to(self.device), positions.to(self.device), self.additive(allowed)).cpu()


def runner(model: torch.nn.Module, batch: int, needed: int, width: int, compile: bool) -> StaticRunner:
    """The cached runner for this shape (compiling once per model, batch, rounded max_len, width, compile)."""
    max_len = -(-needed // SLOT_ROUNDING) * SLOT_ROUNDING
    runners = model.__dict__.setdefault("_cllm_static_runners", {})
    key = (batch, max_len, width, compile)
    if key not in runners:
        runners[key] = StaticRunner(model, max_len, compile)
    return runners[key]


def jacobi_slots(width: int, n: int, max_new_tokens: int, batch: int) -> int:
    """Cache slots a Jacobi decode may need: the pointer advances by the batch's longest run each pass."""
    return width + n + max_new_tokens * (1 if batch == 1 else n)


@torch.no_grad()
def static_greedy_ar(
    model: torch.nn.Module,
    prompts: Prompts,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    compile: bool = True,
    max_len: int = 0,
) -> list[list[int]]:
    """Greedy AR with a static cache and a compiled [batch, 1] step; returns each row's generated ids.

    `max_len`: cache slots to allocate at least (pass the largest any call will need, so one graph serves all).
    """
    eos_ids = _as_set(eos_token_id)
    tokens: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens <= 0:
        return tokens
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    width = input_ids.shape[1]
    run = runner(model, len(prompts), max(width + max_new_tokens, max_len), 1, compile)
    valid = torch.zeros((len(prompts), run.max_len), dtype=torch.bool)
    valid[:, :width] = attention_mask.bool()
    token = run.prefill(input_ids, attention_mask)
    positions = attention_mask.sum(-1)
    done = [False] * len(prompts)
    start = width
    while True:
        for row, value in enumerate(token.tolist()):
            if not done[row]:
                tokens[row].append(value)
                done[row] = value in eos_ids or len(tokens[row]) >= max_new_tokens
        if all(done):
            return tokens
        token = run.run(token[:, None], positions[:, None], valid, start)[:, 0]
        start, positions = start + 1, positions + 1


def compiled_ar(model, prompts: Prompts, *, max_new_tokens: int, eos, pad_token_id: int, max_len: int) -> list[list]:
    """`static_greedy_ar` called with `cllm.runners.greedy_ar`'s arguments (`eos`: the id or ids that end a row), with
    `max_len` slots so that one compiled graph serves every prompt of a benchmark."""
    return static_greedy_ar(
        model, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_token_id, max_len=max_len
    )


@torch.no_grad()
def static_jacobi_generate(
    model: torch.nn.Module, prompts: Prompts, options: DecodeOptions, *, compile: bool = True, max_len: int = 0
) -> JacobiResult:
    """`cllm.jacobi.jacobi_generate` on the fast path: same options, same outputs and passes (same guesses).

    `max_len` as in `static_greedy_ar` (see `jacobi_slots`). No lockstep hook: the fast path runs one process.
    """
    if options.all_done is not None:
        raise ValueError("static_jacobi_generate does not decode in lockstep (all_done); use jacobi_generate")
    n, max_new_tokens, pad_token_id = options.n, options.max_new_tokens, options.pad_token_id
    generator = options.generator()
    batch = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    accepted_per_pass: list[list[int]] = [[] for _ in range(batch)]
    if batch == 0 or max_new_tokens <= 0:
        return JacobiResult(tokens, accepted_per_pass, n)
    prompt_tensors = [torch.as_tensor(list(prompt), dtype=torch.long) for prompt in prompts]
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    width = input_ids.shape[1]
    # Holes: the write pointer advances by the batch's longest run, up to n per pass for every committed token.
    run = runner(model, batch, max(jacobi_slots(width, n, max_new_tokens, batch), max_len), n, compile)
    valid = torch.zeros((batch, run.max_len), dtype=torch.bool)
    valid[:, :width] = attention_mask.bool()
    known = run.prefill(input_ids, attention_mask)
    positions = attention_mask.sum(-1)
    block = _fill_block(known[:, None], prompt_tensors, options, generator)
    active = list(range(batch))
    offsets = torch.arange(n)
    start = width
    while active:
        predictions = run.run(block, positions[:, None] + offsets, valid, start)
        accepted, carried, needs_guess = jacobi_step(block, predictions)
        finished = set()
        for row in active:
            proposed = block[row, : accepted[row]].tolist()
            if commit(tokens[row], accepted_per_pass[row], proposed, options):
                finished.add(row)
        live = torch.zeros(batch, dtype=torch.bool)
        live[active] = True
        accepted = torch.where(live, accepted, 0)
        longest = int(accepted.max())
        run.cache.crop(longest - n)
        valid[:, start : start + n] = offsets < accepted[:, None]  # holes; slots past `longest` are rewritten
        start, positions = start + longest, positions + accepted
        # Next block: q[a-1], q[a:], then fresh guesses (drawn for the rows active in this pass, as jacobi does).
        fresh = _fill_block(carried[active, :1], [prompt_tensors[r] for r in active], options, generator)
        block[active] = torch.where(needs_guess[active], fresh, carried[active])
        active = [row for row in active if row not in finished]
    return JacobiResult(tokens, accepted_per_pass, n)


def recycle_slots(width: int, pass_width: int, longest_run: int, max_new_tokens: int, batch: int) -> int:
    """Cache slots a recycling decode may need: the pointer advances by the batch's longest run each pass."""
    return width + pass_width + longest_run + max_new_tokens * (1 if batch == 1 else longest_run)


@torch.no_grad()
def static_recycle_generate(
    model: torch.nn.Module,
    prompts: Prompts,
    options: DecodeOptions,
    *,
    candidates: int = DEFAULT_CANDIDATES,
    pool_size: int = DEFAULT_POOL_SIZE,
    ngram: int | None = None,
    ngrams: Sequence[Sequence[int]] = (),
    compile: bool = True,
    max_len: int = 0,
) -> MultiblockResult:
    """`recycle` (`cllm.decoders.multiblock_generate` with one block) on the fast path: same options, outputs,
    passes and recycled passes; greedy, one process. `max_len` as in `static_greedy_ar` (see `recycle_slots`)."""
    if options.all_done is not None:
        raise ValueError("static_recycle_generate does not decode in lockstep (all_done); use multiblock_generate")
    if candidates < 1 or pool_size < 1:
        raise ValueError(f"need candidates >= 1 and pool_size >= 1; got candidates={candidates} pool_size={pool_size}")
    n, init, pad_token_id = options.n, options.init, options.pad_token_id
    ngram = ngram or n
    generator = options.generator()
    batch = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    accepted_per_pass: list[list[int]] = [[] for _ in range(batch)]
    recycled, window_blocks = [0] * batch, [[] for _ in range(batch)]
    result = MultiblockResult(tokens, accepted_per_pass, n, recycled, window_blocks)
    if batch == 0 or options.max_new_tokens <= 0:
        return result
    prompt_tensors = [torch.as_tensor(list(prompt), dtype=torch.long) for prompt in prompts]
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    width, pass_width = input_ids.shape[1], n + candidates * ngram
    needed = recycle_slots(width, pass_width, max(n, ngram), options.max_new_tokens, batch)
    run = runner(model, batch, max(needed, max_len), pass_width, compile)
    valid = torch.zeros((batch, run.max_len), dtype=torch.bool)
    valid[:, :width] = attention_mask.bool()
    known = run.prefill(input_ids, attention_mask)
    positions = attention_mask.sum(-1)
    pools = seeded_pools(prompts, ngram, pool_size, ngrams)
    guesses = fresh_guesses(prompt_tensors, n - 1, options, generator)
    windows = [[int(known[i])] + guess_row(guesses[i], int(known[i]), init) for i in range(batch)]
    active = list(range(batch))
    start = width
    while active:
        # Finished rows stay in the batch (the shape is fixed) with their last window, ignored.
        grams = [pools[i].candidates(w[0], candidates, w) if i in active else [] for i, w in enumerate(windows)]
        segments = [[windows[i]] + [list(g) for g in grams[i]] for i in range(batch)]
        ids, ids_positions, packed, offsets = pack_segments(segments, valid[:, :start], positions, pad_token_id)
        used = ids.shape[1]
        allowed = torch.zeros((batch, 1, pass_width, run.max_len), dtype=torch.bool)
        allowed[:, :, :used, : start + used] = packed
        allowed[:, 0, used:, :start] = valid[:, None, :start]  # padding queries: the cache and themselves
        pad_slots = torch.arange(used, pass_width)
        allowed[:, 0, pad_slots, start + pad_slots] = True
        full_ids = torch.full((batch, pass_width), pad_token_id, dtype=torch.long)
        full_ids[:, :used] = ids
        full_positions = positions[:, None].repeat(1, pass_width)
        full_positions[:, :used] = ids_positions
        predictions = run.run_masked(full_ids, full_positions, allowed).tolist()
        ids = ids.tolist()

        accepted, sources, finished = [0] * batch, [0] * batch, set()
        for row in active:
            runs = [(accepted_length(ids[row][s : s + k], predictions[row][s : s + k]), s, k) for s, k in offsets[row]]
            best = max(range(len(runs)), key=lambda s: (runs[s][0], -s))  # ties: the window (Jacobi state) wins
            run_length, source, length = runs[best]
            recycled[row] += best > 0
            window, window_predictions = windows[row], predictions[row][:n]
            done = commit(tokens[row], accepted_per_pass[row], ids[row][source : source + run_length], options)
            window_blocks[row].append(1)
            accepted[row], sources[row] = run_length, source
            draws = fresh_guesses([prompt_tensors[row]], n - 1, options, generator)[0]  # drawn as `recycle` does
            if done:
                finished.add(row)
                continue
            pools[row].add_all(window + window_predictions[-1:], range(len(window)))
            merged = predictions[row][source : source + length] + window_predictions[length:]
            carried = merged[run_length - 1 : run_length - 1 + n]
            windows[row] = carried + guess_row(draws[len(carried) - 1 : n - 1], carried[0], init)

        longest = max(accepted)
        for row in range(batch):  # a recycled winner's slots move down to the pointer: the cache stays in order
            if sources[row]:
                source, count = start + sources[row], accepted[row]
                for layer in run.cache.layers:
                    for states in (layer.keys, layer.values):
                        states[row, :, start : start + count] = states[row, :, source : source + count].clone()
        run.cache.crop(longest - pass_width)
        kept = torch.tensor(accepted)
        valid[:, start : start + longest] = torch.arange(longest) < kept[:, None]  # holes; the rest is rewritten
        start, positions = start + longest, positions + kept
        active = [row for row in active if row not in finished]
    return result

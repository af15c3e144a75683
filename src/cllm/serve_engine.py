"""One forward pass at a time over a changing set of rows: the decoding engine under `cllm serve`.

`cllm.decoders` decode a fixed batch to its end in one call. A server needs the pass as its unit: after each pass it
streams every row's new tokens, drops the rows that finished or whose client left, and admits queued requests into
the running batch (continuous batching). `StepDecoder` is `multiblock_generate` with one block in flight (K = 1)
written as that step, from the same pieces (`NGramPool`, `cllm.segments`, `commit`): G = 0 pool candidates is `jacobi`,
G > 0 is `recycle`, and n = 1 is greedy AR. The acceptance rule is the decoders' own, per segment s:

    a_s = 1 + max{k : x[i] == q[i-1] for 1 <= i <= k};   the longest run commits x[:a], q[a-1] is next known-correct

so every pass commits >= 1 token of greedy AR's output. A sampled row (G = 0 only) takes its own
`cllm.sampling.SampledJacobiRule` instead of argmax and this rule: exact in distribution, as `jacobi_generate`'s.
Each row draws its guesses (and its samples) from generators of its own, so neither its tokens nor its pass count
depend on its batch-mates; a row alone draws exactly what `decode_batched` draws, pass for pass (tested). A row
admitted into a running batch is prefilled on its own and its KV cache joined to the batch's, both left-padded to
the longer; padding is masked and positions are logical, so it shifts nothing."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from cllm.decoders import DEFAULT_POOL_SIZE
from cllm.jacobi import DecodeOptions, cache_argument, commit, prefill
from cllm.ngram_pool import NGramPool
from cllm.prefill import greedy_pick
from cllm.sampling import SampledJacobiRule
from cllm.segments import accepted_length, additive_mask, fresh_guesses, guess_row, keep_winners, pack_segments


@dataclass
class Row:
    """One request's decoding state: its prompt, budget and guess generator, the current window (first token known
    correct), its n-gram pool, and what it has committed so far (tokens, tokens per pass, passes won by the pool)."""

    key: Hashable
    prompt: torch.Tensor
    options: DecodeOptions
    generator: torch.Generator
    pool: NGramPool
    window: list[int]
    rule: SampledJacobiRule | None = None  # None: greedy
    tokens: list[int] = field(default_factory=list)
    accepted_per_pass: list[int] = field(default_factory=list)
    recycled_passes: int = 0


@dataclass
class StepOutput:
    """What one pass did for one row: the tokens it committed and whether the row is finished (EOS or budget)."""

    key: Hashable
    tokens: list[int]
    done: bool
    row: Row


class StepDecoder:
    """Greedy Jacobi (`candidates=0`), recycle (`candidates > 0`) or AR (`n=1`) decoding, one pass per `step()`.

    Args:
        model: a Hugging Face causal LM.
        n: block size.
        eos_token_id: id or ids that end a row (kept in its output).
        pad_token_id: filler for padding (never attended to).
        init: initial guess of fresh window positions (`cllm.jacobi.INIT_STRATEGIES`).
        seed: seed of every row's guess generator.
        candidates: G, pool n-grams verified per pass (recycle); 0 for plain Jacobi.
        pool_size, ngram: the pool's n-grams kept per first token, and their length (default n).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        n: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int,
        init: str = "context",
        seed: int = 0,
        candidates: int = 0,
        pool_size: int = DEFAULT_POOL_SIZE,
        ngram: int | None = None,
    ) -> None:
        self.model, self.n, self.candidates = model, n, candidates
        self.options = DecodeOptions(n=n, eos_token_id=eos_token_id, pad_token_id=pad_token_id, init=init, seed=seed)
        self.pool_size, self.ngram = pool_size, ngram or n
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.rows: list[Row] = []
        self.cache = self.attention_mask = self.next_position = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def add(self, requests: Sequence[tuple]) -> None:
        """Prefill `(key, prompt ids, max_new_tokens[, sampling])` requests in one pass and join them to the running
        batch; a `cllm.sampling.SamplingSettings` that is not greedy samples its row (its seed seeds the guesses too).
        """
        if not requests:
            return
        samplings = [request[3] if len(request) > 3 and not request[3].greedy else None for request in requests]
        if self.candidates and any(samplings):
            raise ValueError("recycle cannot sample exactly (see cllm.sampling.UNSUPPORTED)")
        rules = [SampledJacobiRule(s, s.generator(self.device)) if s else None for s in samplings]
        options = [
            replace(self.options, max_new_tokens=request[2], seed=s.seed if s else self.options.seed)
            for request, s in zip(requests, samplings)
        ]
        prompts = [torch.as_tensor(list(request[1]), dtype=torch.long) for request in requests]

        def pick(logits: torch.Tensor) -> torch.Tensor:  # each row's first token: argmax, or its rule's draw
            return torch.cat([(r.first if r else greedy_pick)(logits[i : i + 1]) for i, r in enumerate(rules)])

        cache, attention_mask, next_position, known = prefill(self.model, prompts, self.options.pad_token_id, pick)
        rows = []
        for request, prompt, option, rule, first in zip(requests, prompts, options, rules, known.tolist()):
            generator = option.generator()
            guesses = fresh_guesses([prompt], self.n - 1, option, generator)[0]
            pool = NGramPool(self.ngram, self.pool_size)
            if self.candidates:
                pool.add_all(prompt.tolist())
            window = [first] + guess_row(guesses, first, option.init)
            rows.append(Row(request[0], prompt, option, generator, pool, window, rule))
        self._join(cache, attention_mask, next_position)
        self.rows += rows

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One forward pass over every row's window and pool candidates; commit, then drop the finished rows."""
        if not self.rows:
            return []
        segments = [
            [row.window] + [list(g) for g in row.pool.candidates(row.window[0], self.candidates, row.window)]
            for row in self.rows
        ]
        pad = self.options.pad_token_id
        input_ids, position_ids, mask, offsets = pack_segments(segments, self.attention_mask, self.next_position, pad)
        out = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=additive_mask(mask, self.dtype).to(self.device),
            position_ids=position_ids.to(self.device),
            use_cache=True,
            **cache_argument(self.model, self.cache),
        )
        predictions = out.logits.argmax(-1).cpu().tolist()
        ids = input_ids.tolist()
        outputs, keep_slots, keep_lengths = [], [], []
        for i, row in enumerate(self.rows):
            if row.rule is not None:  # sampled: the speculative rule on the window's logits
                output, accepted = self._sampled(row, out.logits[i : i + 1, : self.n])
                outputs.append(output)
                keep_slots.append(list(range(accepted)))
                keep_lengths.append(accepted)
                continue
            runs = [(accepted_length(ids[i][s : s + k], predictions[i][s : s + k]), s, k) for s, k in offsets[i]]
            best = max(range(len(runs)), key=lambda s: (runs[s][0], -s))  # ties: the window (Jacobi state) wins
            accepted, start, length = runs[best]
            row.recycled_passes += best > 0
            before = len(row.tokens)
            done = commit(row.tokens, row.accepted_per_pass, ids[i][start : start + accepted], row.options)
            outputs.append(StepOutput(row.key, row.tokens[before:], done, row))
            keep_slots.append(list(range(start, start + accepted)))
            keep_lengths.append(accepted)
            draws = fresh_guesses([row.prompt], self.n - 1, row.options, row.generator)[
                0
            ]  # drawn every pass, as decoders
            if done:
                continue
            window_predictions = predictions[i][: self.n]
            if self.candidates:
                row.pool.add_all(row.window + window_predictions[-1:], range(self.n))
            # Next window: the winner's predictions from q[a-1] on, then the window's, then fresh guesses.
            merged = predictions[i][start : start + length] + window_predictions[length:]
            carried = merged[accepted - 1 : accepted - 1 + self.n]
            row.window = carried + guess_row(draws[len(carried) - 1 : self.n - 1], carried[0], row.options.init)
        self.attention_mask = keep_winners(self.cache, self.attention_mask, keep_slots, keep_lengths, self.device)
        self.next_position = self.next_position + torch.tensor(keep_lengths)
        self.drop([output.key for output in outputs if output.done])
        return outputs

    def _sampled(self, row: Row, logits: torch.Tensor) -> tuple[StepOutput, int]:
        """A sampled row's pass, as `jacobi_generate` makes it with the row's rule: accept, commit, next window."""
        accepted, carried, needs_guess = row.rule.step(torch.tensor([row.window]), logits)
        accepted = int(accepted[0])
        before = len(row.tokens)
        done = commit(row.tokens, row.accepted_per_pass, row.window[:accepted], row.options)
        draws = fresh_guesses([row.prompt], self.n - 1, row.options, row.generator)[0]
        first = int(carried[0, 0])
        fresh = torch.tensor([[first] + guess_row(draws, first, row.options.init)])
        row.window = row.rule.refill(needs_guess, fresh, carried)[0].tolist()
        return StepOutput(row.key, row.tokens[before:], done, row), accepted

    def drop(self, keys: Sequence[Hashable]) -> None:
        """Remove rows (finished, or their client left) from the batch and its cache."""
        gone = set(keys)
        keep = [i for i, row in enumerate(self.rows) if row.key not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.attention_mask = self.next_position = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(index.to(self.device))
        self.attention_mask, self.next_position = self.attention_mask[index], self.next_position[index]
        # Cache slots no remaining row attends to (a longer row's left padding, shared holes) go.
        first = int(self.attention_mask.any(0).long().argmax())
        if first:
            self._map_cache(lambda states: states[:, :, first:])
            self.attention_mask = self.attention_mask[:, first:]

    def _join(self, cache, attention_mask: torch.Tensor, next_position: torch.Tensor) -> None:
        """Append freshly prefilled rows to the batch, left-padding the shorter cache to the longer one."""
        if not self.rows:
            self.cache, self.attention_mask, self.next_position = cache, attention_mask, next_position
            return
        width = max(self.attention_mask.shape[1], attention_mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            for name in ("keys", "values"):
                joined = [_left_pad(getattr(layer, name), width, dim=2) for layer in (old, new)]
                setattr(old, name, torch.cat(joined))
        self.attention_mask = torch.cat([_left_pad(m, width, dim=1) for m in (self.attention_mask, attention_mask)])
        self.next_position = torch.cat([self.next_position, next_position])

    def _map_cache(self, change) -> None:
        for layer in self.cache.layers:
            layer.keys, layer.values = change(layer.keys), change(layer.values)


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros on the left of `dim` up to `width` (the sequence dim: 2 for cached states, 1 for the mask)."""
    missing = width - tensor.shape[dim]
    if not missing:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim) + [missing, 0]
    return F.pad(tensor, pad)

"""Greedy Jacobi decoding for any Hugging Face causal LM, batched, with a KV cache.

One step, for a committed context `c` (in the cache) and a block `b` of n tokens whose first token is
known to be correct:

    q = argmax p(. | c, b[:i+1])  for i = 0..n-1          (one forward pass over the whole block)
    a = 1 + max{k : b[i] == q[i-1] for all 1 <= i <= k}   (accepted length, at least 1)

`b[:a]` is committed, `q[a-1]` is the next known-correct token, and `q[a:]` are the next guesses. Each
pass commits at least one token that greedy AR would also have produced, so the output equals greedy AR
token for token. The figure of merit is generated tokens / decode passes (prefill excluded): AR is 1.0.

`jacobi_step` is that update alone (`GreedyRule`); `jacobi_generate` is the loop around it (KV cache, budget, EOS,
finished rows); `cllm.sampled_jacobi` puts an exact sampled rule in the same loop. `DecodeOptions` holds the settings
every decoder takes (n, budget, EOS, padding, initial guess, seed, the lockstep hook); a decoder's own settings are
its keyword arguments. The decoders beyond one block and the one batched-decode helper used by bench, the
accepted-tokens callback and the headline (`decode_batched`, decoders by name in `DECODERS`) live in `cllm.decoders`.

Batched rows accept different lengths per pass. The cache stays rectangular: it keeps the slots up to
the longest accepted run of the batch, and each row's rejected slots are masked out ("holes").
Positions are logical (per row), so a hole never shifts the rotary positions of what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from cllm.prefill import Prompts, cache_argument, greedy_pick, left_pad, prefill  # noqa: F401 (left_pad: re-exported)

INIT_STRATEGIES = ("context", "repeat", "pad")


@dataclass(frozen=True)
class DecodeOptions:
    """The settings every decoder takes: `jacobi_generate`, `cllm.decoders.multiblock_generate` (and the named
    decoders built on it) and `cllm.compiled.static_jacobi_generate`.

    Attributes:
        n: block size (tokens refined in parallel per pass); n=1 is plain greedy AR.
        max_new_tokens: generation budget per row.
        eos_token_id: id or ids that end a row (included in its output).
        pad_token_id: filler for left padding (never attended to).
        init: initial guess for fresh block positions, one of INIT_STRATEGIES.
        seed: seed of the guess generator (the output does not depend on it; the step count may).
        all_done: for distributed callers: given this process's "all my rows finished" flag, return whether
            every process has finished. While others still run, this process keeps making (dummy) forward
            passes, so sharded models (FSDP) stay in lockstep.
    """

    n: int = 16
    max_new_tokens: int = 256
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int = 0
    init: str = "context"
    seed: int = 0
    all_done: Callable[[bool], bool] | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"block size n must be >= 1, got {self.n}")
        if self.init not in INIT_STRATEGIES:
            raise ValueError(f"unknown init strategy {self.init!r}; choose one of {INIT_STRATEGIES}")

    @property
    def eos_ids(self) -> set[int]:
        return _as_set(self.eos_token_id)

    def generator(self) -> torch.Generator:
        """A fresh generator of initial guesses: the same seed draws the same guesses in every decoder."""
        return torch.Generator().manual_seed(self.seed)


@dataclass
class JacobiResult:
    """Generated tokens and per-sequence statistics of one `jacobi_generate` call.

    Attributes:
        tokens: per row, the generated ids (prompt excluded; EOS included when reached).
        accepted_per_pass: per row, the tokens committed by each decode pass (sums to len(tokens[row])).
        n: the block size used.
    """

    tokens: list[list[int]]
    accepted_per_pass: list[list[int]]
    n: int

    @classmethod
    def concat(cls, results: Sequence[JacobiResult], n: int) -> JacobiResult:
        """The rows of several results, in order, as one result."""
        return cls([row for r in results for row in r.tokens], [row for r in results for row in r.accepted_per_pass], n)

    @property
    def forward_passes(self) -> list[int]:
        return [len(passes) for passes in self.accepted_per_pass]

    @property
    def accepted_tokens_per_step(self) -> list[float]:
        """Per sequence: generated tokens / decode forward passes (prefill excluded; AR = 1.0)."""
        return [len(tokens) / max(len(passes), 1) for tokens, passes in zip(self.tokens, self.accepted_per_pass)]

    @property
    def mean_accepted_tokens_per_step(self) -> float:
        """The headline metric: the per-sequence ratio, averaged over sequences."""
        values = self.accepted_tokens_per_step
        return sum(values) / max(len(values), 1)


def accepted_lengths(block: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """a = 1 + length of the leading run of i >= 1 with block[i] == predictions[i-1]; shape [batch]."""
    matches = (block[:, 1:] == predictions[:, :-1]).long()
    return 1 + matches.cumprod(dim=-1).sum(dim=-1)


def jacobi_step(block: torch.Tensor, predictions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Jacobi update of a batch of blocks b [rows, n], given the predictions q = argmax over them [rows, n]:

        a = 1 + max{k : b[i] == q[i-1] for all 1 <= i <= k};   commit b[:a];   next block = q[a-1:] + (a-1) guesses

    Returns the accepted lengths a [rows], the next block's carried tokens [rows, n] and the mask of its slots
    that need a fresh guess (the last a-1 of each row).
    """
    n = block.shape[1]
    accepted = accepted_lengths(block, predictions)
    index = accepted[:, None] - 1 + torch.arange(n)  # next block slot j takes q[a-1+j] while that exists
    carried = predictions.gather(1, index.clamp(max=n - 1))
    return accepted, carried, index >= n


class GreedyRule:
    """How `jacobi_generate` picks and accepts tokens: argmax predictions and `jacobi_step` (the default).

    A rule has four methods: `first` (the prefill's known-correct token from its last logits), `step` (one pass's
    logits -> accepted lengths, carried tokens, slots needing a guess), `refill` (the next block) and `keep` (rows
    that stay). `cllm.sampled_jacobi.SampledJacobiRule` is the other one: the same loop, sampled exactly.
    """

    first = staticmethod(greedy_pick)

    def step(self, block: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return jacobi_step(block, logits.argmax(-1).cpu())

    def refill(self, needs_guess: torch.Tensor, fresh: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        return torch.where(needs_guess, fresh, carried)

    def keep(self, index: torch.Tensor) -> None:
        pass


def initial_guess(
    prompts: Sequence[torch.Tensor], count: int, strategy: str, pad_token_id: int, generator: torch.Generator
) -> torch.Tensor:
    """Guesses for `count` block positions per row, shape [rows, count].

    `context` (the official CLLM choice) draws tokens uniformly from the row's prompt; `pad` fills with the
    pad id. (`repeat`, the known-correct token again, needs that token: the callers fill it in themselves.)
    """
    if strategy == "context":
        rows = []
        for prompt in prompts:
            picks = torch.randint(len(prompt), (count,), generator=generator)
            rows.append(prompt[picks])
        return torch.stack(rows) if rows else torch.empty(0, count, dtype=torch.long)
    if strategy == "pad":
        return torch.full((len(prompts), count), pad_token_id, dtype=torch.long)
    raise ValueError(f"initial_guess draws 'context' or 'pad' guesses, not {strategy!r}")


@torch.no_grad()
def jacobi_generate(
    model: torch.nn.Module, prompts: Prompts, options: DecodeOptions, rule: GreedyRule | None = None
) -> JacobiResult:
    """Jacobi decoding of a batch of prompts (token id lists of any lengths): greedy, or sampled with a `rule`.

    Args:
        model: a Hugging Face causal LM (input_ids, attention_mask, position_ids, KV cache).
        prompts: one list of token ids per row; rows may differ in length and finish at different times.
        options: block size, budget, EOS, padding, initial guess, seed and lockstep hook (`DecodeOptions`).
        rule: how tokens are picked and accepted (default `GreedyRule`; sampled: `cllm.sampled_jacobi`).
    """
    rule = rule or GreedyRule()
    n, pad_token_id, all_done = options.n, options.pad_token_id, options.all_done
    device = next(model.parameters()).device
    generator = options.generator()
    batch = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    accepted_per_pass: list[list[int]] = [[] for _ in range(batch)]
    if batch == 0 or options.max_new_tokens <= 0:
        _finish_lockstep(model, all_done, pad_token_id, device)
        return JacobiResult(tokens, accepted_per_pass, n)
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")

    prompt_tensors = [torch.as_tensor(list(prompt), dtype=torch.long) for prompt in prompts]
    cache, attention_mask, next_position, known = prefill(model, prompt_tensors, pad_token_id, rule.first)
    block = _fill_block(known[:, None], prompt_tensors, options, generator)
    rows = list(range(batch))  # original index of each active row

    offsets = torch.arange(n)
    while True:
        if not _keep_going(bool(rows), all_done):
            break
        if not rows:
            model(input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device))
            continue
        step_mask = torch.cat([attention_mask, torch.ones((len(rows), n), dtype=torch.long)], dim=1)
        out = model(
            input_ids=block.to(device),
            attention_mask=step_mask.to(device),
            position_ids=(next_position[:, None] + offsets).to(device),
            use_cache=True,
            **cache_argument(model, cache),
        )
        accepted, carried, needs_guess = rule.step(block, out.logits)

        finished = []
        for i, row in enumerate(rows):
            if commit(tokens[row], accepted_per_pass[row], block[i, : accepted[i]].tolist(), options):
                finished.append(i)

        # Keep cache slots up to the longest accepted run; mask each row's rejected slots (holes).
        longest = int(accepted.max())
        if longest < n:
            cache.crop(longest - n)
        attention_mask = torch.cat([attention_mask, (offsets[:longest] < accepted[:, None]).long()], dim=1)
        next_position = next_position + accepted

        # Next block: the known-correct token q[a-1], the later predictions q[a:], then fresh guesses.
        fresh = _fill_block(carried[:, :1], [prompt_tensors[row] for row in rows], options, generator)
        block = rule.refill(needs_guess, fresh, carried)

        if finished:
            keep = sorted(set(range(len(rows))) - set(finished))
            rows = [rows[i] for i in keep]
            if rows:
                keep_index = torch.tensor(keep, dtype=torch.long)
                cache.batch_select_indices(keep_index.to(device))
                rule.keep(keep_index)
                attention_mask, next_position, block = (
                    attention_mask[keep_index],
                    next_position[keep_index],
                    block[keep_index],
                )
    return JacobiResult(tokens, accepted_per_pass, n)


def commit(generated: list[int], passes: list[int], accepted: list[int], options: DecodeOptions) -> bool:
    """Append a pass's accepted tokens to a row's output, cut at the budget and after an EOS; record the count.

    Returns whether the row is finished (budget spent or EOS reached).
    """
    committed = accepted[: options.max_new_tokens - len(generated)]
    done = len(generated) + len(committed) >= options.max_new_tokens
    eos_ids = options.eos_ids
    for j, token in enumerate(committed):
        if token in eos_ids:
            committed, done = committed[: j + 1], True
            break
    generated.extend(committed)
    passes.append(len(committed))
    return done


def _fill_block(
    first: torch.Tensor, prompts: Sequence[torch.Tensor], options: DecodeOptions, generator: torch.Generator
) -> torch.Tensor:
    """[rows, n] block: the known-correct first token, then n-1 guesses from the init strategy."""
    if options.init == "repeat":
        return first.expand(-1, options.n).clone()
    guesses = initial_guess(prompts, options.n - 1, options.init, options.pad_token_id, generator)
    return torch.cat([first, guesses], dim=1)


def _keep_going(has_rows: bool, all_done: Callable[[bool], bool] | None) -> bool:
    if all_done is None:
        return has_rows
    return not all_done(not has_rows)


def _finish_lockstep(model, all_done, pad_token_id, device) -> None:
    """A process with nothing to decode still joins the others' forward passes until all are done.

    The first dummy pass stands for the prefill that the other processes make before their first check.
    """
    if all_done is None:
        return
    model(input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device))
    while not all_done(True):
        model(input_ids=torch.full((1, 1), pad_token_id, dtype=torch.long, device=device))


def _as_set(ids: int | Sequence[int] | None) -> set[int]:
    if ids is None:
        return set()
    if isinstance(ids, int):
        return {ids}
    return {int(i) for i in ids}

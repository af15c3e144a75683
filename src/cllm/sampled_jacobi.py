"""Sampled Jacobi decoding, exact in distribution: Speculative Jacobi Decoding (Teng et al., arXiv 2410.01699).

The token drawn for a block slot in the previous pass is a draft from the distribution q it was drawn from; each pass
tests every draft with the speculative-sampling rule and redraws the rejected ones (`redraft`), so each slot's new
token is an exact draw from the model's p there. Greedy Jacobi's acceptance then applies to these predictions as it
does to argmax ones (`speculative_jacobi_step` is `cllm.jacobi.jacobi_step` on them), and every committed token is a
draw from p given the tokens before it: the output is distributed as `model.generate(do_sample=True)`'s. One choice
of ours: a slot's next draft is coupled to its current one (kept unless p moved away from q) instead of drawn afresh,
so a block settles as in greedy Jacobi. `SampledJacobiRule` and `SampledWindowRule` put the rule in the decode loops
of `jacobi` and `multiblock` (KV cache, holes, budget, EOS, rows finishing apart, as in greedy decoding); the settings
(p: temperature, top-k, top-p) are `cllm.sampling.SamplingSettings`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from cllm.jacobi import GreedyRule, jacobi_step


class Distribution(Protocol):
    """What a sampled rule needs of its settings (`cllm.sampling.SamplingSettings` is one): p from the logits."""

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor: ...


def draw(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token from each distribution of `probs` [..., vocab] (unnormalised weights allowed).

    Inverse CDF: the first token whose cumulative weight exceeds u * total, u ~ U[0, 1) (a zero weight is never
    drawn). On the CPU this is ~20x faster than `torch.multinomial` over a 49k vocabulary.
    """
    flat = probs.reshape(-1, probs.shape[-1])
    cdf = flat.cumsum(-1)
    u = torch.rand((len(flat), 1), generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, u, right=True)[:, 0]
    tokens = torch.where(tokens < flat.shape[-1], tokens, flat.argmax(-1))  # u * total rounded up to the total
    return tokens.view(probs.shape[:-1])


def point_masses(tokens: torch.Tensor, like: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
    """`like` [..., vocab] with the slots in `where` (default all) replaced by the point mass on their token: the q
    of a guess that is no draw from the model."""
    where = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device) if where is None else where
    masses = like.masked_fill(where[..., None], 0.0)
    masses[where.nonzero(as_tuple=True) + (tokens[where],)] = 1.0
    return masses


def redraft(
    block: torch.Tensor, draft_probs: torch.Tensor, probs: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Sampled Jacobi's predictions for blocks b [rows, W]: c_1 .. c_W [rows, W], c_{j+1} a draw from p_j.

    b[0] is an exact draw; each draft b[i] (i >= 1) was drawn from q_i = `draft_probs`[:, i] [rows, W, vocab];
    p_i = `probs`[:, i] = p(. | c, b[:i+1]) from this pass. Each b[i] is kept with probability
    min(1, p_{i-1}(b[i]) / q_i(b[i])), else redrawn from max(0, p_{i-1} - q_i) (normalised); c_W is a fresh draw
    from p_{W-1}. Then c_i is a draw from p_{i-1}: given the prefix,
        P(c_i = y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(p, q)(x)) max(0, p(y) - q(y)) / sum max(0, p - q)
                   = min(p, q)(y) + max(0, p(y) - q(y)) = p(y)       (as sum max(0, p - q) = 1 - sum min(p, q)).
    So greedy Jacobi's acceptance applies to these predictions as it does to argmax ones: a = 1 + the leading run of
    b[i] == c_i, commit b[:a] and c_a. Each committed token is a c_i, a draw from p given the tokens before it, since
    the run stops where the prefix stops being the committed one. The c_i after slot a are the next drafts, with
    q = p_{i-1}. Exactness needs b[i] ~ q_i given everything computed from the tokens before its position, in this
    pass and earlier ones: c_i depends only on b[i], p_{i-1} and its own coins, so that holds pass after pass; a
    guess that is no draw from the model is a point mass (kept with probability p(x), else p without x). Coupling
    c_i to b[i] (it stays b[i] unless p moved away from q there) lets a block settle as in greedy Jacobi: a draft
    whose prefix is unchanged since it was drawn is kept surely (p = q).
    """
    tokens = block[:, 1:, None]
    p_x = probs[:, :-1].gather(-1, tokens)[..., 0]
    q_x = draft_probs[:, 1:].gather(-1, tokens)[..., 0]
    coins = torch.rand(p_x.shape, generator=generator, dtype=p_x.dtype, device=p_x.device)
    row, slot = (coins * q_x >= p_x).nonzero(as_tuple=True)  # rejected where u >= p/q (not dividing by q)
    coupled = block[:, 1:].clone()
    if len(row):
        p, q = probs[row, slot], draft_probs[row, slot + 1]
        residual = (p - q).clamp(min=0)
        coupled[row, slot] = draw(torch.where(residual.sum(-1, keepdim=True) > 0, residual, p), generator)
    return torch.cat([coupled, draw(probs[:, -1:], generator)], dim=1)


def speculative_jacobi_step(
    block: torch.Tensor, draft_probs: torch.Tensor, probs: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of sampled Jacobi: `cllm.jacobi.jacobi_step` on the `redraft` predictions (arguments as there).

    Returns the accepted lengths a [rows], the next block's carried tokens [rows, W] and the mask of its slots that
    need a fresh guess (on the CPU, as `jacobi_step`), and the carried tokens' draft distributions [rows, W, vocab]
    (c_{j+1} was drawn from p_j).
    """
    predictions = redraft(block, draft_probs, probs, generator).cpu()
    accepted, carried, needs_guess = jacobi_step(block.cpu(), predictions)
    index = (accepted[:, None] - 1 + torch.arange(block.shape[1])).clamp(max=block.shape[1] - 1).to(probs.device)
    rows, width, vocab = probs.shape
    flat = (torch.arange(rows, device=probs.device)[:, None] * width + index).view(-1)
    return accepted, carried, needs_guess, probs.reshape(-1, vocab).index_select(0, flat).view(rows, width, vocab)


class SampledJacobiRule(GreedyRule):
    """`cllm.jacobi.jacobi_generate`'s rule for sampled Jacobi: the prefill's token drawn from p, every pass
    `speculative_jacobi_step`. Beside the loop's block it keeps q, the distribution each slot was drawn from."""

    def __init__(self, sampling: Distribution, generator: torch.Generator) -> None:
        self.sampling, self.generator = sampling, generator
        self.draft_probs: torch.Tensor | None = None  # [rows, n, vocab]: q of each slot of the current block
        self.carried_probs: torch.Tensor | None = None

    def first(self, logits: torch.Tensor) -> torch.Tensor:
        return draw(self.sampling.probabilities(logits), self.generator).cpu()

    def step(self, block: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = self.sampling.probabilities(logits)
        block = block.to(probs.device)
        if self.draft_probs is None:  # the first block: its guesses come from the init strategy
            self.draft_probs = point_masses(block, probs)
        accepted, carried, needs_guess, self.carried_probs = speculative_jacobi_step(
            block, self.draft_probs, probs, self.generator
        )
        return accepted, carried, needs_guess

    def refill(self, needs_guess: torch.Tensor, fresh: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        block = torch.where(needs_guess, fresh, carried)
        device = self.carried_probs.device
        self.draft_probs = point_masses(block.to(device), self.carried_probs, needs_guess.to(device))
        return block

    def keep(self, index: torch.Tensor) -> None:
        self.draft_probs = self.draft_probs[index.to(self.draft_probs.device)]


class SampledWindowRule:
    """`cllm.decoders.multiblock_generate`'s rule for sampled multiblock (one window per row, of its own width, no
    recycled segments): `redraft` predictions in place of argmax ones, the window's q kept per row."""

    first = SampledJacobiRule.first

    def __init__(self, sampling: Distribution, generator: torch.Generator) -> None:
        self.sampling, self.generator = sampling, generator
        self.draft_probs: list[torch.Tensor | None] = []  # per active row: q of each window slot [width, vocab]
        self.probs = torch.empty(0)  # this pass's p [rows, width, vocab]
        self.widths: list[int] = []  # this pass's window width per row

    def predictions(self, logits: torch.Tensor, windows: list[list[int]]) -> list[list[int]]:
        """Per row, c_1 .. c_W over its window, padded to the pass's width (as `logits.argmax(-1).tolist()`).

        Rows are padded with point masses: c_{W+1} of a row is then a draw from p_W coupled to a padding token (an
        exact draw all the same), and the slots after it are never read.
        """
        width = logits.shape[1]
        self.probs = self.sampling.probabilities(logits)
        tokens = torch.tensor([window + [0] * (width - len(window)) for window in windows], device=self.probs.device)
        draft_probs = point_masses(tokens, self.probs)
        self.draft_probs += [None] * (len(windows) - len(self.draft_probs))
        for i, row in enumerate(self.draft_probs):
            if row is not None:
                draft_probs[i, : len(row)] = row
        self.widths = [len(window) for window in windows]
        return redraft(tokens, draft_probs, self.probs, self.generator).tolist()

    def carry(self, i: int, accepted: int, window: list[int]) -> None:
        """Row i's next window: its slots from this pass's predictions (q = p_{a-1+k}), then point-mass guesses."""
        probs = self.probs[i]
        carried = min(len(window), self.widths[i] - accepted + 1)
        guesses = torch.tensor(window[carried:], dtype=torch.long, device=probs.device)
        self.draft_probs[i] = torch.cat(
            [
                probs[accepted - 1 : accepted - 1 + carried],
                point_masses(guesses, probs.new_zeros(len(guesses), probs.shape[-1])),
            ]
        )

    def keep(self, keep: list[int]) -> None:
        self.draft_probs = [self.draft_probs[i] for i in keep]

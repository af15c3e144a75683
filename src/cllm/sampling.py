"""Sampling (temperature, top-k, top-p) for AR and Jacobi decoding, exact in distribution.

"The model's distribution" p is what Hugging Face sampling draws from: the logits in float32 (float64 kept),
transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` in `generate`'s order, softmax.
`temperature == 0` is greedy decoding, the greedy code path unchanged.

Sampled Jacobi is Speculative Jacobi Decoding (Teng et al., arXiv 2410.01699): the token drawn for a block slot in
the previous pass is a draft from the distribution q it was drawn from, verified left to right with the speculative
sampling rule (`speculative_jacobi_step`, `redraft`), so every committed token is an exact draw from p given the
tokens before it: the output is distributed as `model.generate(do_sample=True)`'s (`sampled_ar`, the baseline). One
choice of ours: a slot's next draft is coupled to its current one (kept unless p moved away from q) instead of drawn
afresh, so a block settles as in greedy Jacobi. The rule runs in `cllm.jacobi.jacobi_generate`'s loop
(`SampledJacobiRule`: KV cache, holes, budget, EOS and rows finishing at different times as in greedy decoding);
`cllm.decoders.decode_batched(..., sampling=...)` picks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cllm.errors import UserError
from cllm.jacobi import DecodeOptions, GreedyRule, JacobiResult, jacobi_generate
from cllm.prefill import Prompts, left_pad

SAMPLED_DECODERS = ("jacobi",)  # decoders with an exact sampled rule
UNSUPPORTED = {  # why the others refuse sampling
    "multiblock": "not implemented (its window is one causal sequence, so the same rule would apply to all of it)",
    "recycle": "it commits the longest of several verified candidates, and keeping the best of several speculative "
    "tests biases the distribution (exact multi-draft verification is not implemented)",
}
UNSUPPORTED["multiblock+recycle"] = UNSUPPORTED["recycle"]


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are drawn, shared by AR (`sampled_ar`) and the decoders.

    Attributes:
        temperature: logits are divided by it; 0 is greedy decoding (argmax, the other settings unused).
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1.0: all).
        seed: seed of the draws: the same seed, prompts and batches give the same output.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0: no top-k), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1] (1: no top-p), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def warpers(self) -> LogitsProcessorList:
        """transformers' warpers, as `generate(do_sample=True, temperature=, top_k=, top_p=)` builds them."""
        warpers = LogitsProcessorList()
        if self.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            warpers.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            warpers.append(TopPLogitsWarper(self.top_p))
        return warpers

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """p over the last dimension of `logits` [..., vocab]: what Hugging Face sampling draws from."""
        scores = logits.reshape(-1, logits.shape[-1])
        scores = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)  # HF: float32
        return self.warpers()(None, scores).softmax(-1).view(logits.shape)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def label(self) -> str:
        if self.greedy:
            return "greedy"
        return f"T={self.temperature:g} top_k={self.top_k} top_p={self.top_p:g} seed={self.seed}"


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The speculative-sampling test of every draft of blocks b [rows, W], and every slot's next draft.

    b[0] is an exact draw; each draft b[i] (i >= 1) was drawn from q_i = `draft_probs`[:, i] [rows, W, vocab];
    p_i = `probs`[:, i] = p(. | c, b[:i+1]) from this pass. Each b[i] is kept with probability
    min(1, p_{i-1}(b[i]) / q_i(b[i])), else redrawn from max(0, p_{i-1} - q_i) (normalised): the result c_i is a
    draw from p_{i-1}, since given the prefix
        P(c_i = y) = q(y) min(1, p(y)/q(y)) + (1 - sum_x min(p, q)(x)) max(0, p(y) - q(y)) / sum max(0, p - q)
                   = min(p, q)(y) + max(0, p(y) - q(y)) = p(y)       (as sum max(0, p - q) = 1 - sum min(p, q)),
    and c_W is a fresh draw from p_{W-1}. p_{i-1} is p given c + b[:i], the right conditional only while b[1:i] are
    all kept, so the caller commits the leading kept run b[:a] and c_a; the c_i after it are the next drafts, with
    q = p_{i-1}. Each c_i is coupled to b[i] (it stays b[i] unless p moved away from q there), so the block settles
    as greedy Jacobi does, and drafts whose prefix did not change are kept surely (p = q). Exactness needs b[i] ~ q_i
    given everything computed from the tokens before its position, in this pass and earlier ones: c_i depends only
    on b[i], on p_{i-1} and on its own coins; a guess that is no draw from the model is a point mass (kept with
    probability p(x), else redrawn from p without x).

    Returns which drafts pass the test [rows, W - 1] and the next drafts c_1 .. c_W [rows, W] (c_{j+1} ~ p_j).
    """
    tokens = block[:, 1:, None]
    p_x = probs[:, :-1].gather(-1, tokens)[..., 0]
    q_x = draft_probs[:, 1:].gather(-1, tokens)[..., 0]
    coins = torch.rand(p_x.shape, generator=generator, dtype=p_x.dtype, device=p_x.device)
    kept = coins * q_x < p_x  # u < p/q, without dividing by q
    residual = (probs[:, :-1] - draft_probs[:, 1:]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, probs[:, :-1])  # p == q: always kept
    coupled = torch.where(kept, block[:, 1:], draw(residual, generator))
    return kept, torch.cat([coupled, draw(probs[:, -1:], generator)], dim=1)


def speculative_jacobi_step(
    block: torch.Tensor, draft_probs: torch.Tensor, probs: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass of sampled Jacobi over blocks b [rows, W] on `probs`'s device (arguments as `redraft`):

        a = 1 + max{k : b[1..k] all kept};   commit b[:a];   next block = c_a, c_{a+1} .. c_W, then a - 1 guesses

    Returns the accepted lengths a [rows], the next block's carried tokens [rows, W], their draft distributions
    [rows, W, vocab] (c_{j+1} was drawn from p_j) and the mask of the slots that need a fresh guess (the last a - 1),
    all as `cllm.jacobi.jacobi_step`.
    """
    width = block.shape[1]
    kept, drafts = redraft(block, draft_probs, probs, generator)
    accepted = 1 + kept.long().cumprod(-1).sum(-1)
    index = accepted[:, None] - 1 + torch.arange(width, device=block.device)  # next slot j takes c_{a+j}
    clamped = index.clamp(max=width - 1)
    carried_probs = probs.gather(1, clamped[..., None].expand(-1, -1, probs.shape[-1]))
    return accepted, drafts.gather(1, clamped), carried_probs, index >= width


class SampledJacobiRule(GreedyRule):
    """`cllm.jacobi.jacobi_generate`'s rule for sampled Jacobi: the prefill's token drawn from p, every pass
    `speculative_jacobi_step`. Beside the loop's block it keeps q, the distribution each slot was drawn from."""

    def __init__(self, sampling: SamplingSettings, generator: torch.Generator) -> None:
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
        accepted, carried, self.carried_probs, needs_guess = speculative_jacobi_step(
            block, self.draft_probs, probs, self.generator
        )
        return accepted.cpu(), carried.cpu(), needs_guess.cpu()

    def refill(self, needs_guess: torch.Tensor, fresh: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
        block = torch.where(needs_guess, fresh, carried)
        device = self.carried_probs.device
        self.draft_probs = point_masses(block.to(device), self.carried_probs, needs_guess.to(device))
        return block

    def keep(self, index: torch.Tensor) -> None:
        self.draft_probs = self.draft_probs[index.to(self.draft_probs.device)]


def check_sampled_decoder(decoder: str, compile: bool = False) -> None:
    """Refuse, in one line, a decoder that cannot sample exactly (call only when the settings sample)."""
    if compile:
        raise UserError("--compile with --temperature > 0: the compiled fast path is greedy only; drop one of them")
    if decoder not in SAMPLED_DECODERS:
        why = UNSUPPORTED.get(decoder, "it has no sampled rule")
        raise UserError(f"--decoder {decoder} with --temperature > 0: {why}; use --decoder jacobi or --temperature 0")


def sampled_decoder(decoder: str, sampling: SamplingSettings, model: torch.nn.Module):
    """The decoder `decode_batched` calls for a sampling (not greedy) `decoder` name: one stream of draws, seeded
    by `sampling.seed`, across the batches of one call (a fresh seed per batch would repeat the same draws)."""
    check_sampled_decoder(decoder)
    generator = sampling.generator(next(model.parameters()).device)

    def decode(model: torch.nn.Module, prompts: Prompts, options: DecodeOptions) -> JacobiResult:
        return jacobi_generate(model, prompts, options, SampledJacobiRule(sampling, generator))

    return decode


@torch.no_grad()
def sampled_ar(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos: list[int],
    pad_token_id: int,
    sampling: SamplingSettings,
) -> list[list[int]]:
    """The baseline: Hugging Face `generate(do_sample=True)` at the same settings, one left-padded batch.

    Seeded by `sampling.seed` (the global RNG inside `fork_rng`, so the caller's stream is untouched): the same seed
    and prompts give the same output. Each row is cut after its first EOS.
    """
    if sampling.greedy:
        raise ValueError("sampled_ar needs temperature > 0 (greedy AR is a separate baseline)")
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_token_id)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(sampling.seed)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            eos_token_id=eos or None,
            pad_token_id=pad_token_id,
        )
    rows = [row[ids.shape[1] :].tolist() for row in out.cpu()]
    return [row[: next((i + 1 for i, token in enumerate(row) if token in eos), len(row))] for row in rows]

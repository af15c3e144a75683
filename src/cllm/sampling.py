"""Sampling (temperature, top-k, top-p) for AR and Jacobi decoding, exact in distribution.

"The model's distribution" p is what Hugging Face sampling draws from: the logits in float32 (float64 kept),
transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper` and `TopPLogitsWarper` in `generate`'s order, softmax.
`temperature == 0` is greedy decoding, the greedy code path unchanged.

Sampled Jacobi is Speculative Jacobi Decoding (Teng et al., arXiv 2410.01699), in `cllm.sampled_jacobi`: the math
and the decode-loop rules of `jacobi` and `multiblock`. Here: the settings, the AR baseline (`sampled_ar`), and the
decoders `cllm.decoders.decode_batched(..., sampling=...)` runs (`sampled_decoder`; the others refused in one line).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from cllm.errors import UserError
from cllm.jacobi import DecodeOptions, JacobiResult
from cllm.prefill import Prompts, left_pad
from cllm.sampled_jacobi import SampledJacobiRule, SampledWindowRule

SAMPLED_DECODERS = ("jacobi", "multiblock")  # decoders with an exact sampled rule
UNSUPPORTED = {  # why the others refuse sampling
    "recycle": "it commits the candidate with the longest accepted run, and picking the best of candidates verified "
    "with draws of their own biases the distribution (one draw shared by the candidates at each depth would be "
    "exact; not implemented)",
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

    def for_prompt(self, prompt: Sequence[int]) -> SamplingSettings:
        """These settings with a seed of `prompt`'s own, derived from `seed`: a baseline that samples one prompt at
        a time, reseeded per call with one seed, draws the same uniforms for every prompt, so its outputs start
        alike (the base model's sampled AR answered 4 of 6 json-extract prompts with "The JSON response will") and a
        rate over prompts rests on fewer independent samples than it counts."""
        digest = hashlib.blake2b(repr((self.seed, list(prompt))).encode(), digest_size=8).digest()
        return replace(self, seed=int.from_bytes(digest, "little") >> 1)

    def label(self) -> str:
        if self.greedy:
            return "greedy"
        return f"T={self.temperature:g} top_k={self.top_k} top_p={self.top_p:g} seed={self.seed}"


def check_sampled_decoder(decoder: str, compile: bool = False) -> None:
    """Refuse, in one line, a decoder that cannot sample exactly (call only when the settings sample)."""
    if compile:
        raise UserError("--compile with --temperature > 0: the compiled fast path is greedy only; drop one of them")
    if decoder not in SAMPLED_DECODERS:
        why = UNSUPPORTED.get(decoder, "it has no sampled rule")
        raise UserError(f"--decoder {decoder} with --temperature > 0: {why}; use --decoder jacobi or --temperature 0")


def sampled_decoder(
    name: str, decoder: Callable[..., JacobiResult], sampling: SamplingSettings, model: torch.nn.Module
):
    """`decoder` (named `name` in `cllm.decoders.DECODERS`) sampling: a fresh rule per call, one stream of draws
    seeded by `sampling.seed` across the calls (a fresh seed per batch would repeat the same draws)."""
    check_sampled_decoder(name)
    rule = SampledJacobiRule if name == "jacobi" else SampledWindowRule
    generator = sampling.generator(next(model.parameters()).device)

    def decode(model: torch.nn.Module, prompts: Prompts, options: DecodeOptions, **own) -> JacobiResult:
        return decoder(model, prompts, options, rule=rule(sampling, generator), **own)

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

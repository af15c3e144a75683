"""`python -m cllm generate`: decode one prompt (`--decoder`, default jacobi), print the completion and statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from transformers.utils import logging as hf_logging

from cllm.arguments import parse_settings
from cllm.compiled import static_jacobi_generate
from cllm.data_modules.prompts import Prompt, check_context, encode_prompts
from cllm.decoders import (
    DECODERS,
    DEFAULT_BLOCKS,
    DEFAULT_CANDIDATES,
    DEFAULT_POOL_SIZE,
    DEFAULT_THRESHOLD,
    decode_batched,
)
from cllm.errors import UserError
from cllm.jacobi import DecodeOptions
from cllm.models import context_length, eos_ids, load_model
from cllm.sampling import SamplingSettings, check_sampled_decoder


@dataclass(kw_only=True)
class DecodeSettings:
    """Settings shared by `generate` and `bench`: the model and how it decodes.

    Args:
        model: smollm2-135m | path.gguf | HF folder | hub id | tiny[:k=v].
        n: block size (tokens refined per pass); bench also takes auto (measures and picks).
        dtype: auto (the fastest here, see `cllm.hardware`) | float32 | bfloat16 | float16 | float64.
        device: cpu | cuda | cuda:1 ...
        attn_implementation: auto | sdpa | eager | flash_attention_2.
        init: initial guess of fresh block positions: context (official) | repeat | pad.
        chat_template: encode prompts through the tokenizer's chat template (`--no_chat_template`: raw text).
        trust_remote_code: allow model code from the hub (unsafe).
        blocks: K, the most blocks in flight (multiblock).
        threshold: r, the settled share of block 1 that drafts one more block (multiblock).
        candidates: G, pool n-grams verified per pass (recycle).
        pool_size: n-grams kept per first token and row (recycle).
        ngram: pool n-gram length (recycle; default n).
        compile: the fast path: static KV cache + torch.compile (greedy AR and the fixed-shape jacobi step).
        temperature: 0: greedy (the default); > 0: sample, exact in distribution (jacobi; see `cllm.sampling`).
        top_k: sample among the k most likely tokens (0: all).
        top_p: sample among the fewest most likely tokens whose probability reaches top_p (1.0: all).
        seed: seed of the draws and of the initial guesses: the same seed gives the same output.
    """

    model: str
    n: int | Literal["auto"] = 16
    dtype: str = "auto"
    device: str = "cpu"
    attn_implementation: str = "auto"
    init: Literal["context", "repeat", "pad"] = "context"
    chat_template: bool = True
    trust_remote_code: bool = False
    blocks: int = DEFAULT_BLOCKS
    threshold: float = DEFAULT_THRESHOLD
    candidates: int = DEFAULT_CANDIDATES
    pool_size: int = DEFAULT_POOL_SIZE
    ngram: int | None = None
    compile: bool = False
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def sampling(self) -> SamplingSettings:
        """The sampling settings (`SamplingSettings`; refuses impossible values)."""
        return SamplingSettings(self.temperature, self.top_k, self.top_p, self.seed)

    def decoder_options(self) -> dict:
        """The decoders' own settings, for `cllm.decoders.decode_batched(decoder_options=...)`."""
        return {name: getattr(self, name) for name in ("blocks", "threshold", "candidates", "pool_size", "ngram")}


@dataclass(kw_only=True)
class GenerateSettings(DecodeSettings):
    """`cllm generate`: decode one prompt.

    Args:
        prompt: the prompt text.
        max_new_tokens: generation budget.
        decoder: jacobi | multiblock | recycle | multiblock+recycle (see `cllm.decoders`).
    """

    prompt: str
    max_new_tokens: int = 256
    decoder: str = "jacobi"


def load_for_decoding(settings: DecodeSettings):
    """(model, tokenizer) of `settings.model`, after checking the block size and the decoder settings."""
    hf_logging.disable_progress_bar()
    check_decoding_settings(settings)
    return load_model(
        settings.model,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
    )


def check_decoding_settings(settings: DecodeSettings) -> None:
    """Refuse impossible decoding settings before a model loads."""
    import torch

    if settings.n != "auto" and settings.n < 1:
        raise UserError(f"--n must be >= 1, got {settings.n}")
    for name, least in (("blocks", 1), ("candidates", 0), ("pool_size", 1)):
        if getattr(settings, name) < least:
            raise UserError(f"--{name} must be >= {least}, got {getattr(settings, name)}")
    if not 0.0 <= settings.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {settings.threshold}")
    names = getattr(settings, "decoder", "jacobi")
    for name in [names] if isinstance(names, str) else names:
        if name not in DECODERS:
            raise UserError(f"unknown --decoder {name!r}; choose one of {', '.join(DECODERS)}")
        if not settings.sampling().greedy:
            check_sampled_decoder(name, settings.compile)
    budget = getattr(settings, "max_new_tokens", 1)
    if budget < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {budget}")
    if str(settings.device).startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise UserError(f"--device {settings.device}: CUDA is not available ({build}); use --device cpu")


def generate(settings: GenerateSettings) -> None:
    """Decode `settings.prompt`, print the completion and its statistics."""
    if settings.n == "auto":
        raise UserError("--n auto is a bench option (it measures on a prompt set); give generate an integer")
    if settings.compile and settings.decoder != "jacobi":
        raise UserError("--compile serves the fixed-shape jacobi decoder only")
    model, tokenizer = load_for_decoding(settings)
    (prompt_ids,) = encode_prompts(
        tokenizer, [Prompt("prompt", settings.prompt)], settings.chat_template, context_length(model), "--prompt"
    )
    check_context(prompt_ids, settings.max_new_tokens, context_length(model), "--prompt and --max_new_tokens")
    start = time.perf_counter()
    options = DecodeOptions(
        n=settings.n,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        init=settings.init,
        seed=settings.seed,
    )
    sampling = settings.sampling()
    if settings.compile:
        result = static_jacobi_generate(model, [prompt_ids], options)
    else:
        result = decode_batched(
            model,
            [prompt_ids],
            batch_size=1,
            decoder=settings.decoder,
            options=options,
            decoder_options=settings.decoder_options(),
            sampling=sampling,
        )
    seconds = time.perf_counter() - start
    tokens = result.tokens[0]
    label = f"{settings.decoder} n={settings.n}" + (" compiled" if settings.compile else "")
    label += "" if sampling.greedy else f" {sampling.label()}"
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(
        f"[{label}] {len(tokens)} tokens in {result.forward_passes[0]} decode passes: "
        f"{result.mean_accepted_tokens_per_step:.3f} accepted tokens/step (generated/passes, AR = 1.0), "
        f"{len(tokens) / seconds:.1f} tokens/s"
    )


def main(argv: list[str]) -> None:
    generate(parse_settings(GenerateSettings, argv, "cllm generate", __doc__))

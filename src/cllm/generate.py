"""`python -m cllm generate`: Jacobi-decode one prompt, print the completion and one line of statistics."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from transformers.utils import logging as hf_logging

from cllm.arguments import parse_settings
from cllm.data_modules.prompts import Prompt, encode_prompts
from cllm.errors import UserError
from cllm.jacobi import jacobi_generate
from cllm.models import context_length, eos_ids, load_model


@dataclass(kw_only=True)
class DecodeSettings:
    """Settings shared by `generate` and `bench`: the model and how it decodes.

    Args:
        model: smollm2-135m | path.gguf | HF folder | hub id | tiny[:k=v].
        n: Jacobi block size (tokens refined per pass).
        dtype: float32 | bfloat16 | float16 | float64.
        device: cpu | cuda | cuda:1 ...
        attn_implementation: auto | sdpa | eager | flash_attention_2.
        init: initial guess of fresh block positions: context (official) | repeat | pad.
        chat_template: encode prompts through the tokenizer's chat template (`--no_chat_template`: raw text).
        trust_remote_code: allow model code from the hub (unsafe).
    """

    model: str
    n: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    attn_implementation: str = "auto"
    init: Literal["context", "repeat", "pad"] = "context"
    chat_template: bool = True
    trust_remote_code: bool = False


@dataclass(kw_only=True)
class GenerateSettings(DecodeSettings):
    """`cllm generate`: Jacobi-decode one prompt.

    Args:
        prompt: the prompt text.
        max_new_tokens: generation budget.
    """

    prompt: str
    max_new_tokens: int = 256


def load_for_decoding(settings: DecodeSettings):
    """(model, tokenizer) of `settings.model`, after checking the block size."""
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

    if settings.n < 1:
        raise UserError(f"--n must be >= 1, got {settings.n}")
    budget = getattr(settings, "max_new_tokens", 1)
    if budget < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {budget}")
    if str(settings.device).startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU build of torch" if torch.version.cuda is None else "no visible CUDA device"
        raise UserError(f"--device {settings.device}: CUDA is not available ({build}); use --device cpu")


def generate(settings: GenerateSettings) -> None:
    """Decode `settings.prompt`, print the completion and its statistics."""
    model, tokenizer = load_for_decoding(settings)
    (prompt_ids,) = encode_prompts(
        tokenizer, [Prompt("prompt", settings.prompt)], settings.chat_template, context_length(model), "--prompt"
    )
    start = time.perf_counter()
    result = jacobi_generate(
        model,
        [prompt_ids],
        n=settings.n,
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        init=settings.init,
    )
    seconds = time.perf_counter() - start
    tokens = result.tokens[0]
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(
        f"[jacobi n={settings.n}] {len(tokens)} tokens in {result.forward_passes[0]} decode passes: "
        f"{result.mean_accepted_tokens_per_step:.3f} accepted tokens/step (generated/passes, AR = 1.0), "
        f"{len(tokens) / seconds:.1f} tokens/s"
    )


def main(argv: list[str]) -> None:
    generate(parse_settings(GenerateSettings, argv, "cllm generate", __doc__))

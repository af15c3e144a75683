"""The start of every decode loop: left-padded prompts, one prefill pass into a KV cache, the cache keyword.

Used by `cllm.jacobi` (and through it the other decoders), trajectory collection and the AR baselines.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

Prompts = Sequence[Sequence[int]]  # a batch: one list of token ids per row, rows of any lengths


def left_pad(prompts: Prompts, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, width] ids and attention mask with every prompt right-aligned (padding on the left)."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        attention_mask[row, width - len(prompt) :] = 1
    return input_ids, attention_mask


def greedy_pick(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary, on the CPU."""
    return logits.argmax(-1).cpu()


def prefill(
    model: torch.nn.Module,
    prompts: Prompts,
    pad_token_id: int,
    pick: Callable[[torch.Tensor], torch.Tensor] = greedy_pick,
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over the left-padded prompts.

    Returns the KV cache, the attention mask over its slots, each row's next logical position, and each row's
    first known-correct token, `pick` of the last logits [rows, vocab] (default argmax p(. | prompt); a sampled
    decoder draws it instead). All on the CPU but the cache.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    cache = DynamicCache(config=getattr(model, "config", None))
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        use_cache=True,
        logits_to_keep=1,
        **cache_argument(model, cache),
    )
    return cache, attention_mask, attention_mask.sum(-1), pick(out.logits[:, -1])


def cache_argument(model: torch.nn.Module, cache: DynamicCache) -> dict:
    """The KV cache keyword: `cache` in recent transformers 5.x, `past_key_values` before (now deprecated)."""
    parameters = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in parameters else {"past_key_values": cache}

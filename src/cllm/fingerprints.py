"""Fingerprints: short hashes that say whether two tokenizers or two sets of weights are the same.

A trajectory folder, a LoRA checkpoint and an export record them, so data collected with one model is refused
against another (`cllm.dataset_checks`), cheaply even at 7B (a sample of each tensor, not all of it).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from cllm.models import build_tiny, local_folder


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of what decides token ids: the vocabulary, the special tokens and the chat template."""
    digest = hashlib.sha256()
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        digest.update(f"{index}\t{token}\n".encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module, sample: int = 1024) -> str:
    """Hash of parameter names, shapes and the first/last `sample` values of each (cheap even at 7B).

    Values are rounded to bfloat16 first, so the same weights loaded in float32 or bfloat16 match.
    """
    items = (
        (name, tensor.shape, _edges(tensor.detach().reshape(-1), sample)) for name, tensor in model.state_dict().items()
    )
    return _fingerprint(items)


def weights_fingerprint(spec: str, sample: int = 1024) -> str | None:
    """`model_fingerprint` of the model a spec loads, read from its safetensors files without loading the weights
    (a few KB per tensor); None where that cannot be done cheaply (a hub id not on disk, .bin weights)."""
    if spec == "tiny" or spec.startswith("tiny:"):
        return model_fingerprint(build_tiny(spec)[0], sample)
    folder = local_folder(spec)
    files = sorted(Path(folder).glob("*.safetensors")) if folder else []
    if not files:
        return None
    from safetensors import safe_open
    from transformers import AutoConfig

    with torch.device("meta"):  # the state_dict's names and tied aliases, without memory
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    aliases: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    stored = {}
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():
                stored[name] = file
    items = []
    for name, parameter in sorted(model.state_dict(keep_vars=True).items()):
        source = next((n for n in [name, *aliases.get(id(parameter), [])] if n in stored), None)
        if source is None:
            return None  # a weight the files do not hold under any of its names: cannot compare
        with safe_open(str(stored[source]), framework="pt") as weights:
            items.append((name, parameter.shape, _slice_edges(weights.get_slice(source), sample)))
    return _fingerprint(items)


def _edges(flat: torch.Tensor, sample: int) -> torch.Tensor:
    return torch.cat([flat[:sample], flat[-sample:]])


def _slice_edges(view, sample: int) -> torch.Tensor:
    """The first and last `sample` values of a safetensors tensor, reading only the rows that hold them."""
    shape = view.get_shape()
    if len(shape) == 0:
        return _edges(view[()].reshape(-1), sample)
    row = max(1, math.prod(shape[1:]))
    rows = min(shape[0], math.ceil(sample / row))
    head = view[:rows].reshape(-1)[:sample]
    tail = view[shape[0] - rows :].reshape(-1)[-sample:]
    return torch.cat([head, tail])


def _fingerprint(items) -> str:
    digest = hashlib.sha256()
    for name, shape, values in sorted(items, key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(shape)}".encode())
        digest.update(values.to("cpu", torch.bfloat16).to(torch.float32).numpy().tobytes())
    return digest.hexdigest()[:16]

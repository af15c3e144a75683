"""The settings of a trajectory collection (`cllm trajectories`, and `TrajectoryDataModule` when it collects)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cllm.errors import UserError
from cllm.jacobi import INIT_STRATEGIES


@dataclass
class CollectSettings:
    """`cllm trajectories`: settings of one trajectory collection (every field is a `--FIELD` flag).

    Args:
        model: model spec (`smollm2-135m`, `tiny`, a .gguf file, a local HF folder).
        prompts: prompt source (`stdlib-code:train`, a .jsonl/.parquet file, a saved HF dataset folder).
        output: dataset folder (manifest.json + shards); relative to the current folder.
        n: block size (tokens refined in parallel).
        max_new_tokens: generated tokens per prompt (the last block may run past it; records keep full blocks).
        batch_size: prompts per forward pass.
        limit: collect only the first `limit` prompts.
        dtype: model dtype while collecting (auto: the fastest here, see `cllm.hardware`; float32, bfloat16, ...).
        init: initial guess of each block: `context` (tokens drawn from the prompt, official), `repeat`, `pad`.
        seed: seed of the initial guesses (and of the augmentation).
        chat_template: apply the tokenizer's chat template to prompts.
        clean: drop records whose fixed point holds a run of >= 10 identical tokens (counted in the manifest).
        augment: add augmented intermediate states (official CLLM augmentation, see docs/data.md).
        labels: store ground-truth answer ids (prompts need an answer).
        prompt_field: prompt column of a .jsonl/.parquet/HF dataset source.
        answer_field: answer column (ground truth), if any.
        shard_size: prompts per shard (the unit of resumption and of work split across ranks).
        attn_implementation: `auto`, `sdpa`, `eager`, `flash_attention_2`.
        accelerator: Lightning accelerator (`auto`, `cpu`, `gpu`).
        devices: devices per node; more than 1 (or num_nodes > 1) runs through Lightning's Trainer.predict.
        num_nodes: nodes.
        import_official: path of an official CLLM trajectory JSON to convert instead of collecting.
    """

    model: str = "smollm2-135m"
    prompts: str = "stdlib-code:train"
    output: str = "trajectories"
    n: int = 16
    max_new_tokens: int = 256
    batch_size: int = 8
    limit: int | None = None
    dtype: str = "auto"
    init: Literal["context", "repeat", "pad"] = "context"
    seed: int = 0
    chat_template: bool = True
    clean: bool = False
    augment: bool = False
    labels: bool = False
    prompt_field: str = "prompt"
    answer_field: str | None = None
    shard_size: int = 64
    attn_implementation: str = "auto"
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    import_official: str | None = None


def row_seed(seed: int, prompt_index: int) -> int:
    """Seed of prompt `prompt_index`'s initial guesses: independent of batch, rank and interruptions."""
    return seed * 1_000_003 + prompt_index


def check_config(config: CollectSettings) -> None:
    """Refuse impossible settings before a model is loaded or a file written."""
    if config.init not in INIT_STRATEGIES:
        raise UserError(f"--init {config.init!r} is not one of {INIT_STRATEGIES}")
    for key in ("n", "max_new_tokens", "batch_size", "shard_size", "devices", "num_nodes"):
        if getattr(config, key) < 1:
            raise UserError(f"--{key} must be at least 1, not {getattr(config, key)}")
    if config.limit is not None and config.limit < 1:
        raise UserError(f"--limit must be at least 1, not {config.limit}")

"""Collecting Jacobi trajectories: every state of the full-block iteration, block by block, batched.

Full-block iteration for a committed context c and an n-token window (one forward pass per iteration):

    state_{t+1}[0] = argmax p(. | c)        state_{t+1}[i] = argmax p(. | c, state_t[:i])   (i = 1..n-1)

until the state repeats; that state is the fixed point y* (= the next n tokens of greedy AR decoding), the
next block's context is c + y*, and a prompt stops at EOS or after `max_new_tokens` generated tokens.
After iteration t the first t tokens are final, so a block needs at most n + 1 passes.

`collect_dataset` turns a prompt set into shards of a fixed prompt range (resumable: a finished shard is never
redone; every row draws its initial guesses from its own seeded generator, so the records do not depend on the
batch, the rank or an interruption) and `write_dataset_manifest` lists them. `python -m cllm trajectories`
runs both, on one process or through Lightning's `Trainer.predict` on every device and node it is given.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.data_modules.records import (
    MANIFEST_NAME,
    SHARD_PATTERN,
    Record,
    atomic_write_text,
    longest_run,
    shard_entry,
    write_manifest,
    write_shard,
)
from cllm.errors import UserError
from cllm.jacobi import INIT_STRATEGIES, initial_guess

REPETITION_LIMIT = 10  # cleaning drops fixed points holding a run of this many identical tokens
SETTINGS_NAME = "collection.json"


@dataclass
class CollectConfig:
    """Settings of one trajectory collection (every field is a `cllm trajectories --FIELD` flag).

    Args:
        model: model spec (`smollm2-135m`, `tiny`, a .gguf file, a local HF folder).
        prompts: prompt source (`stdlib-code:train`, a .jsonl/.parquet file, a saved HF dataset folder).
        output: dataset folder (manifest.json + shards); relative to the current folder.
        n: block size (tokens refined in parallel).
        max_new_tokens: generated tokens per prompt (the last block may run past it; records keep full blocks).
        batch_size: prompts per forward pass.
        limit: collect only the first `limit` prompts.
        dtype: model dtype while collecting (float32, bfloat16, float16, float64).
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
    dtype: str = "float32"
    init: str = "context"
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


@torch.no_grad()
def collect_trajectories(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    n: int,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int = 0,
    init: str = "context",
    seeds: Sequence[int] | None = None,
) -> list[list[tuple[list[int], list[list[int]]]]]:
    """Full-block Jacobi trajectories of a batch of prompts.

    Returns, per prompt, one `(prefix_ids, states)` pair per block: `prefix_ids` are the fixed points of the
    earlier blocks, `states` run from the initial guess to the fixed point (recorded once). `seeds[row]` seeds
    that row's initial guesses, so a row's trajectory does not depend on its batch.
    """
    if init not in INIT_STRATEGIES:
        raise UserError(f"unknown init strategy {init!r}; choose one of {INIT_STRATEGIES}")
    if n < 1 or max_new_tokens < 1:
        raise UserError(f"n and max_new_tokens must be >= 1 (got n={n}, max_new_tokens={max_new_tokens})")
    eos_ids = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    device = next(model.parameters()).device
    batch = len(prompts)
    seeds = list(seeds) if seeds is not None else list(range(batch))
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    prompt_tensors = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
    blocks: list[list[tuple[list[int], list[list[int]]]]] = [[] for _ in range(batch)]
    generated: list[list[int]] = [[] for _ in range(batch)]
    if batch == 0:
        return blocks

    # Prefill the left-padded prompts once; the cache then grows by one fixed point per block.
    width = max(len(p) for p in prompt_tensors)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompt_tensors):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    cache = DynamicCache(config=getattr(model, "config", None))
    out = model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        position_ids=(attention_mask.cumsum(-1) - 1).clamp(min=0).to(device),
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    known = out.logits[:, -1].argmax(-1).cpu()  # argmax p(. | context): state[0] of every later iteration
    next_position = attention_mask.sum(-1)
    rows = list(range(batch))
    offsets = torch.arange(n)

    while rows:
        state = _block_guess(known, n, [prompt_tensors[r] for r in rows], [generators[r] for r in rows], init)
        states = [[state[i].tolist()] for i in range(len(rows))]
        converged = torch.zeros(len(rows), dtype=torch.bool)
        step_mask = torch.cat([attention_mask, torch.ones((len(rows), n), dtype=torch.long)], dim=1).to(device)
        positions = (next_position[:, None] + offsets).to(device)
        for _ in range(2 * n + 2):  # n + 1 passes suffice in exact arithmetic; the rest is a guard
            out = model(
                input_ids=state.to(device),
                attention_mask=step_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            )
            predictions = out.logits.argmax(-1).cpu()
            new_state = torch.cat([known[:, None], predictions[:, :-1]], dim=1)
            repeated = (new_state == state).all(-1)
            for i in torch.nonzero(~converged & ~repeated).flatten().tolist():
                states[i].append(new_state[i].tolist())
            converged |= repeated
            # A converged row keeps its fixed point as input, so its cache slots stay right.
            state = torch.where(converged[:, None], state, new_state)
            if bool(converged.all()):
                break
            cache.crop(-n)  # drop the block's slots; the next pass rewrites them
        else:
            raise RuntimeError("full-block Jacobi iteration did not converge in 2n+2 passes (non-deterministic model?)")
        known = predictions[:, -1]  # argmax p(. | context + fixed point): first token of the next block

        finished = []
        for i, row in enumerate(rows):
            blocks[row].append((list(generated[row]), states[i]))
            generated[row].extend(states[i][-1])
            if eos_ids & set(states[i][-1]) or len(generated[row]) >= max_new_tokens:
                finished.append(i)
        attention_mask = torch.cat([attention_mask, torch.ones((len(rows), n), dtype=torch.long)], dim=1)
        next_position = next_position + n
        if finished:
            keep = torch.tensor([i for i in range(len(rows)) if i not in set(finished)], dtype=torch.long)
            rows = [rows[i] for i in keep.tolist()]
            if rows:
                cache.batch_select_indices(keep.to(device))
                attention_mask, next_position, known = attention_mask[keep], next_position[keep], known[keep]
    return blocks


def _block_guess(
    known: torch.Tensor, n: int, prompts: list[torch.Tensor], generators: list[torch.Generator], init: str
) -> torch.Tensor:
    """Initial state of a block, [rows, n]: n guesses per row from the init strategy (`repeat`: the known token)."""
    if init == "repeat":
        return known[:, None].expand(-1, n).clone()
    return torch.cat([initial_guess([p], n, init, 0, g) for p, g in zip(prompts, generators)], dim=0)


def augment_states(states: list[list[int]], rng: random.Random) -> list[list[int]]:
    """Official CLLM augmentation: for each intermediate state with k > 1 wrong tokens, a copy with a random
    number (1..k-1) of its wrong tokens set to the fixed point's — states closer to y* than the trajectory had."""
    fixed_point = states[-1]
    augmented = []
    for state in states[1:-1]:
        wrong = [i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b]
        if len(wrong) < 2:
            continue
        copy = list(state)
        for i in rng.sample(wrong, rng.randint(1, len(wrong) - 1)):
            copy[i] = fixed_point[i]
        augmented.append(copy)
    return augmented


def row_seed(seed: int, prompt_index: int) -> int:
    return seed * 1_000_003 + prompt_index


def load_tokenizer(spec: str):
    """The tokenizer of a model spec without loading the weights (pad token set as `load_model` does)."""
    from transformers import AutoTokenizer

    from cllm import models

    if spec == "tiny" or spec.startswith("tiny:"):
        return models.build_tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(models._local_folder(spec))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Collector:
    """One process's share of a collection: loads prompts and the model, writes the shards of its rank."""

    def __init__(self, config: CollectConfig, model=None, tokenizer=None) -> None:
        from cllm.models import context_length, load_model, model_fingerprint, tokenizer_fingerprint

        self.config = config
        self.folder = Path(config.output)
        if config.init not in INIT_STRATEGIES:
            raise UserError(f"--init {config.init!r} is not one of {INIT_STRATEGIES}")
        if model is None:
            model, tokenizer = load_model(
                config.model, dtype=config.dtype, attn_implementation=config.attn_implementation
            )
        self.model, self.tokenizer = model, tokenizer
        self.generated_tokens = 0
        self.prompts = load_prompts(
            config.prompts, prompt_field=config.prompt_field, answer_field=config.answer_field, limit=config.limit
        )
        budget = context_length(model) - math.ceil(config.max_new_tokens / config.n) * config.n
        self.prompt_ids = encode_prompts(tokenizer, self.prompts, config.chat_template, budget, config.prompts)
        if config.labels and any(p.answer is None for p in self.prompts):
            missing = next(p.id for p in self.prompts if p.answer is None)
            raise UserError(f"--labels needs ground-truth answers; prompt {missing!r} of {config.prompts} has none")
        self.settings = {
            "model": config.model,
            "model_fingerprint": model_fingerprint(model),
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "n": config.n,
            "max_new_tokens": config.max_new_tokens,
            "init": config.init,
            "seed": config.seed,
            "prompts": config.prompts,
            "prompt_count": len(self.prompts),
            "chat_template": config.chat_template,
            "clean": config.clean,
            "augment": config.augment,
            "labels": config.labels,
            "shard_size": config.shard_size,
            "dtype": config.dtype,
        }

    def check_settings(self) -> None:
        """A resumed run must use the settings of the first one, else its shards would mix two datasets."""
        path = self.folder / SETTINGS_NAME
        if path.is_file():
            previous = json.loads(path.read_text(encoding="utf-8"))
            changed = {k: (previous.get(k), v) for k, v in self.settings.items() if previous.get(k) != v}
            if changed:
                detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                raise UserError(
                    f"{path}: {self.folder} holds a collection with other settings ({detail}); "
                    "use another --output or delete the folder"
                )
        else:
            atomic_write_text(path, json.dumps(self.settings, indent=2) + "\n")

    @property
    def shard_count(self) -> int:
        return math.ceil(len(self.prompts) / self.config.shard_size)

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        done = {k for k in range(self.shard_count) if (self.folder / SHARD_PATTERN.format(index=k)).is_file()}
        return [k for k in range(rank, self.shard_count, world_size) if k not in done]

    def collect_shard(self, index: int, progress=None) -> None:
        """Collect the prompts of shard `index` and write it (meta first, then the shard: its presence = done)."""
        config = self.config
        start, stop = index * config.shard_size, min((index + 1) * config.shard_size, len(self.prompts))
        records, dropped, tokens, batch_tokens = [], 0, 0, 0
        eos = self.tokenizer.eos_token_id
        for batch_start in range(start, stop, config.batch_size):
            batch = range(batch_start, min(batch_start + config.batch_size, stop))
            blocks = collect_trajectories(
                self.model,
                [self.prompt_ids[i] for i in batch],
                n=config.n,
                max_new_tokens=config.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id or 0,
                init=config.init,
                seeds=[row_seed(config.seed, i) for i in batch],
            )
            for i, prompt_blocks in zip(batch, blocks):
                new, count = self._records(i, prompt_blocks)
                records += new
                dropped += count
                batch_tokens += sum(len(states[-1]) for _, states in prompt_blocks)
            tokens += batch_tokens
            self.generated_tokens += batch_tokens
            batch_tokens = 0
            if progress is not None:
                progress.update(len(batch))
                elapsed = max(progress.format_dict["elapsed"], 1e-9)
                progress.set_postfix(tokens_per_s=f"{self.generated_tokens / elapsed:.1f}")
        meta = {"prompts": [start, stop], "records": len(records), "dropped_repetitive": dropped, "tokens": tokens}
        atomic_write_text(self.folder / f"shard-{index:05d}.meta.json", json.dumps(meta) + "\n")
        write_shard(self.folder / SHARD_PATTERN.format(index=index), records)

    def _records(self, index: int, prompt_blocks) -> tuple[list[Record], int]:
        prompt = self.prompts[index]
        labels = None
        if self.config.labels:
            answer_ids = self.tokenizer(prompt.answer, add_special_tokens=False)["input_ids"]
            labels = answer_ids + [self.tokenizer.eos_token_id]
        records, dropped = [], 0
        for block_index, (prefix, states) in enumerate(prompt_blocks):
            if self.config.clean and longest_run(states[-1]) >= REPETITION_LIMIT:
                dropped += 1
                continue
            augmented = []
            if self.config.augment:
                augmented = augment_states(states, random.Random(row_seed(self.config.seed, index) * 997 + block_index))
            records.append(
                Record(prompt.id, block_index, list(self.prompt_ids[index]), prefix, states, labels, augmented)
            )
        return records, dropped

    def run(self, rank: int = 0, world_size: int = 1, show_progress: bool = True) -> None:
        from tqdm import tqdm

        self.folder.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        pending = self.pending_shards(rank, world_size)
        total = sum(min(self.config.shard_size, len(self.prompts) - k * self.config.shard_size) for k in pending)
        with tqdm(total=total, unit="prompt", disable=not show_progress, desc=f"trajectories (rank {rank})") as bar:
            for index in pending:
                self.collect_shard(index, bar)


def write_dataset_manifest(folder: Path, settings: dict, extra: dict | None = None) -> dict:
    """List every shard with its record count and sha256; sum the per-shard statistics (rank 0, at the end)."""
    shards, stats = [], {"prompts": 0, "records": 0, "dropped_repetitive": 0, "generated_tokens": 0}
    for path in sorted(folder.glob("shard-*.jsonl")):
        shards.append(shard_entry(folder, path))
        meta_path = path.with_suffix(".meta.json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            stats["prompts"] += meta["prompts"][1] - meta["prompts"][0]
            stats["dropped_repetitive"] += meta.get("dropped_repetitive", 0)
            stats["generated_tokens"] += meta.get("tokens", 0)
        stats["records"] += shards[-1]["records"]
    extra = dict(extra or {})
    stats.update(extra.pop("stats", {}))  # an import knows its prompt count without per-shard meta files
    manifest = {**settings, **extra, "shards": shards, "stats": stats}
    write_manifest(folder, manifest)
    return manifest


class _PredictCollector:
    """Builds the LightningModule that lets `Trainer.predict` spread shards over every device and node."""

    @staticmethod
    def make(collector: Collector):
        from lightning.pytorch import LightningModule
        from torch.utils.data import DataLoader

        class CollectionModule(LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.model = collector.model

            def predict_dataloader(self):
                # Our own split (shard k goes to rank k mod world): a distributed sampler would pad with repeats.
                pending = collector.pending_shards(self.global_rank, self.trainer.world_size)
                return DataLoader(pending, batch_size=None, shuffle=False)

            def predict_step(self, index, batch_idx):
                collector.collect_shard(int(index))

        return CollectionModule()


def run_collection(config: CollectConfig) -> dict:
    """Collect (single process, or Trainer.predict over `devices` x `num_nodes`), then write the manifest."""
    collector = Collector(config)
    if config.devices == 1 and config.num_nodes == 1:
        collector.run()
    else:
        from lightning.pytorch import Trainer

        collector.folder.mkdir(parents=True, exist_ok=True)
        collector.check_settings()
        trainer = Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            num_nodes=config.num_nodes,
            strategy="ddp",
            logger=False,
            enable_checkpointing=False,
            use_distributed_sampler=False,
            enable_progress_bar=True,
        )
        trainer.predict(_PredictCollector.make(collector), return_predictions=False)
        trainer.strategy.barrier()
        if trainer.global_rank != 0:
            return {}
    manifest = write_dataset_manifest(collector.folder, collector.settings)
    stats = manifest["stats"]
    print(
        f"{collector.folder / MANIFEST_NAME}: {stats['records']} records from {stats['prompts']} prompts in "
        f"{len(manifest['shards'])} shards; {stats['generated_tokens']} generated tokens"
        + (f"; cleaning dropped {stats['dropped_repetitive']} repetitive records" if config.clean else "")
    )
    return manifest


def main(argv: list[str]) -> None:
    """`python -m cllm trajectories --config C.yaml --model ... --prompts ... --output ...` (see CollectConfig)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="cllm trajectories", description=__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_class_arguments(CollectConfig, fail_untyped=True)
    parsed = parser.parse_args(argv)
    config = CollectConfig(**{name: parsed[name] for name in asdict(CollectConfig())})
    if config.import_official:
        from cllm.official_import import import_official

        import_official(Path(config.import_official), config)
        return
    run_collection(config)

"""Running a collection: prompts -> shards of records -> manifest, on one process or many.

`Collector` is one process's share: it loads the prompts and the model and writes the shards of its rank
(shard k holds prompts [k * shard_size, (k + 1) * shard_size); a shard file that exists is finished, so a
restarted run redoes only the missing ones). `run_collection` runs it in-process, or through Lightning's
`Trainer.predict` on every device and node (rank r takes shards r, r + W, ...), then writes the manifest on
rank 0. `TrajectoryDataModule.prepare_data` calls the same `run_collection`. `main` is the entry point of
`python -m cllm trajectories` (settings: `CollectSettings`); with `--import_official FILE` it converts the official
CLLM JSON instead (`cllm.official_import`).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from tqdm import tqdm

from cllm.arguments import parse_settings
from cllm.collection_settings import CollectSettings, check_config, row_seed
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.errors import UserError
from cllm.files import atomic_write_text
from cllm.fingerprints import model_fingerprint, tokenizer_fingerprint
from cllm.models import context_length, eos_ids, load_model
from cllm.official_import import import_official
from cllm.records import (
    MANIFEST_NAME,
    REPETITION_LIMIT,
    SHARD_PATTERN,
    Record,
    longest_run,
    write_dataset_manifest,
    write_shard,
)
from cllm.trajectory import augment_states, collect_trajectories

SETTINGS_NAME = "collection.json"


class Collector:
    """One process's share of a collection: loads prompts and the model, writes the shards of its rank."""

    def __init__(self, config: CollectSettings, model=None, tokenizer=None, device: str = "cpu") -> None:
        self.config = config
        self.folder = Path(config.output)
        check_config(config)  # before the model loads and before anything is written
        if model is None:
            model, tokenizer = load_model(
                config.model, dtype=config.dtype, attn_implementation=config.attn_implementation, device=device
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
            "prompt_limit": config.limit,  # what the fit's data.init_args.prompt_limit is checked against
            "prompt_count": len(self.prompts),
            "chat_template": config.chat_template,
            "clean": config.clean,
            "augment": config.augment,
            "labels": config.labels,
            "shard_size": config.shard_size,
            "dtype": str(model.dtype).removeprefix("torch."),  # what `auto` resolved to, for the resume check
            "vocab_size": model.get_input_embeddings().num_embeddings,
            # per shard: a digest of its prompts' ids and token ids, so a resumed run cannot mix two prompt sets
            "prompt_digests": [self._digest(k) for k in range(self.shard_count)],
        }
        limit = self.settings["vocab_size"]
        for prompt, ids in zip(self.prompts, self.prompt_ids):
            if max(ids) >= limit:
                raise UserError(
                    f"prompt {prompt.id!r} of {config.prompts} has token id {max(ids)}, beyond the model's "
                    f"{limit} embeddings: the tokenizer does not belong to this model"
                )

    def _digest(self, index: int) -> str:
        start, stop = index * self.config.shard_size, (index + 1) * self.config.shard_size
        rows = [[p.id, ids, p.answer] for p, ids in zip(self.prompts[start:stop], self.prompt_ids[start:stop])]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]

    def check_settings(self) -> None:
        """A resumed run must use the settings of the first one, else its shards would mix two datasets.

        Settings of a run that wrote no shard yet (it failed first) are simply replaced. A run asking for more
        prompts of the same set (a higher --limit) grows the collection: every shard written holds the same prompts
        as this run's shard of that index (their digests agree), so only the new shards are collected.
        """
        path = self.folder / SETTINGS_NAME
        started = any(self.folder.glob("shard-*.jsonl"))
        if not (path.is_file() and started):
            atomic_write_text(path, json.dumps(self.settings, indent=2) + "\n")
            return
        previous = json.loads(path.read_text(encoding="utf-8"))
        # a key the first run did not record (an older cllm) cannot be compared
        changed = {k: (previous[k], v) for k, v in self.settings.items() if k in previous and previous[k] != v}
        digests, count = changed.pop("prompt_digests", None), changed.pop("prompt_count", None)
        changed.pop("prompt_limit", None)  # the digests and the count decide whether the prompts agree
        if changed:
            detail = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise UserError(
                f"{path}: {self.folder} holds a collection with other settings ({detail}); "
                "use another --output or delete the folder"
            )
        if count and "prompt_digests" not in previous:  # an older cllm's: its shards' prompts cannot be checked
            raise UserError(
                f"{path}: {self.folder} holds {count[0]} prompts collected without prompt digests, this run gives "
                f"{count[1]}; it cannot grow: use another --output"
            )
        if count and count[1] < count[0]:
            raise UserError(
                f"{path}: {self.folder} holds a collection of {count[0]} prompts of {self.config.prompts}, this run "
                f"gives {count[1]}; a collection grows, it never shrinks: use another --output"
            )
        if digests:
            shard = next((k for k, (old, new) in enumerate(zip(*digests)) if old != new), None)
            if shard is not None:
                size = self.config.shard_size
                partial = " (its last shard held fewer prompts: a collection grows by whole shards)"
                raise UserError(
                    f"{path}: the prompts of shard {shard} (prompts {shard * size}..{(shard + 1) * size - 1} of "
                    f"{self.config.prompts}) changed since this collection started"
                    + (partial if count and shard == len(digests[0]) - 1 else "")
                    + "; resuming would mix two prompt sets: use another --output or delete the folder"
                )
        if self.settings != previous:  # grown, or a key an older cllm did not record
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
        eos = eos_ids(self.model, self.tokenizer)
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
        self.folder.mkdir(parents=True, exist_ok=True)
        self.check_settings()
        pending = self.pending_shards(rank, world_size)
        total = sum(min(self.config.shard_size, len(self.prompts) - k * self.config.shard_size) for k in pending)
        with tqdm(total=total, unit="prompt", disable=not show_progress, desc=f"trajectories (rank {rank})") as bar:
            for index in pending:
                self.collect_shard(index, bar)


class CollectionModule(LightningModule):
    """Lets `Trainer.predict` spread a collector's shards over every device and node."""

    def __init__(self, collector: Collector) -> None:
        super().__init__()
        self.collector = collector
        self.model = collector.model

    def predict_dataloader(self):
        # Our own split (shard k goes to rank k mod world): a distributed sampler would pad with repeats.
        pending = self.collector.pending_shards(self.global_rank, self.trainer.world_size)
        return DataLoader(pending, batch_size=None, shuffle=False)

    def predict_step(self, index, batch_idx):
        self.collector.collect_shard(int(index))


def run_collection(config: CollectSettings) -> dict:
    """Collect (single process, or Trainer.predict over `devices` x `num_nodes`), then write the manifest."""
    single = config.devices == 1 and config.num_nodes == 1
    # One process picks the GPU itself; under Trainer.predict, Lightning moves each rank's copy to its device.
    use_cuda = single and config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    collector = Collector(config, device="cuda" if use_cuda else "cpu")
    if single:
        collector.run()
    else:
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
        trainer.predict(CollectionModule(collector), return_predictions=False)
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
    """`python -m cllm trajectories --config C.yaml --model ... --prompts ... --output ...` (see CollectSettings)."""
    config = parse_settings(CollectSettings, argv, "cllm trajectories", __doc__.splitlines()[0])
    if config.import_official:
        import_official(Path(config.import_official), config)
        return
    run_collection(config)

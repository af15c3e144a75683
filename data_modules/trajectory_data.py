"""`TrajectoryDataModule`: streams trajectory shards into (context, state, fixed point) training batches.

It collects the dataset first when the folder has none (`prepare_data`), checks the manifest against the
model's tokenizer and scans the shards once in `setup` (validation, per-record sample counts, cached next to
the shards), and hands out streaming dataloaders (`cllm.data_modules.trajectory_stream`).
"""

from __future__ import annotations

import json
import math
from array import array
from functools import partial
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from cllm.collection import CollectSettings, run_collection
from cllm.data_modules.collate import collate, collate_packed
from cllm.data_modules.jacobi_forcing import NoiseSchedule, collate_forcing
from cllm.data_modules.jacobi_forcing import samples_per_line as forcing_samples_per_line
from cllm.data_modules.prompts import Prompt, load_prompts
from cllm.data_modules.scan_cache import cached_scan
from cllm.data_modules.trajectory_stream import (
    ROW_STRATEGIES,
    STATE_STRATEGIES,
    EpochDataLoader,
    TrajectoryStream,
    samples_per_record,
)
from cllm.dataset_checks import check_collection_settings, check_model_fingerprint, check_token_ids, check_tokenizer
from cllm.errors import UserError
from cllm.files import iter_lines, unit_hash
from cllm.fingerprints import tokenizer_fingerprint, weights_fingerprint
from cllm.models import load_tokenizer
from cllm.records import (
    MANIFEST_NAME,
    block_size,
    parse_record,
    read_manifest,
    verify_checksums,
)


class TrajectoryDataModule(LightningDataModule):
    """Trajectory batches for CLLM training; collects the dataset first when `path` holds none.

    Args:
        path: dataset folder (manifest.json + shards); relative paths are relative to the current folder.
        model: model spec: its tokenizer pads and is checked against the manifest; its model collects. Under
            `cllm fit` it follows `model.init_args.model` when left unset (the model spec is given once).
        prompts: prompt source used when collecting.
        val_prompts: held-out prompts the accepted-tokens callback decodes (`validation_prompts()`).
        val_prompt_limit: use only the first K validation prompts.
        chat_template: apply the tokenizer's chat template to prompts (collection and validation prompts).
        n: block size: the manifest's when `path` holds a dataset (a given n must agree), else this one (needed
            to collect). `cllm fit` links it into the module and the accepted-tokens callback.
        max_new_tokens: generated tokens per prompt when collecting.
        init: initial guess of each block when collecting (`context`, official; `repeat`; `pad`).
        prompt_limit: collect only the first K prompts; a folder collected with another limit is refused (grow it
            with `cllm trajectories --limit K` into the same --output: only the new shards are collected).
        collect_shard_size: prompts per shard when collecting (the unit a killed collection resumes from).
        collect_batch_size: prompts per forward pass when collecting.
        collect_dtype: model dtype when collecting; `auto`: the fastest here (`cllm.hardware`).
        batch_size: samples per training batch.
        num_workers: dataloader worker processes per rank.
        shuffle_buffer: size of the shuffle buffer (memory bound of the stream).
        seed: seed of shuffling and state picking (combined with the epoch).
        state_strategy: `uniform` over non-final states (official), `all` (one sample per state), `noise`, `pack`
            (`pack_states` states of a record in one row sharing the context), or `jacobi_forcing` (one row per
            prompt: every block of its response as a pair noisy_j | fixed_j, `cllm.data_modules.jacobi_forcing`).
        pack_states: with `pack`, the number k of non-final states drawn per record (all when it has fewer).
        forcing_window: with `jacobi_forcing`, blocks per noise window (JF's w).
        forcing_schedule: `progressive` (block j targets noise ratio linspace(min, max, w)[j % w]), `shifted` (the
            grid rotated by a phase drawn per row and epoch) or `random`.
        forcing_noise_min, forcing_noise_max: the ends of that noise-ratio grid.
        forcing_levels: points of the grid (default: forcing_window); another count needs `random` (with
            forcing_window 1 the noisy blocks see clean earlier blocks, as one-block decoders do).
        forcing_synthesise: build a state at the target ratio when the trajectory has none within 1/n.
        next_state: also collate the next state (local consistency loss); augmented states are then unused.
        use_labels: also collate ground-truth labels (prompt + answer ids).
        max_length: contexts longer than max_length - n are truncated from the left (counted, warned).
        val_fraction: share of prompts (by prompt id hash) whose records form the validation dataloader.
        even_batches: every rank and worker yields the same number of full batches (a few samples repeated).
    """

    def __init__(
        self,
        path: str,
        model: str | None = None,
        prompts: str = "stdlib-code:train",
        val_prompts: str = "stdlib-code:validation",
        val_prompt_limit: int | None = 16,
        chat_template: bool = True,
        n: int | None = None,
        max_new_tokens: int = 256,
        init: str = "context",
        prompt_limit: int | None = None,
        collect_shard_size: int = 64,
        collect_batch_size: int = 8,
        collect_dtype: str = "auto",
        batch_size: int = 4,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        state_strategy: str = "uniform",
        pack_states: int = 4,
        forcing_window: int = 4,
        forcing_schedule: str = "progressive",
        forcing_noise_min: float = 0.0,
        forcing_noise_max: float = 1.0,
        forcing_synthesise: bool = False,
        forcing_levels: int | None = None,
        next_state: bool = False,
        use_labels: bool = False,
        max_length: int = 1024,
        val_fraction: float = 0.05,
        even_batches: bool = True,
    ) -> None:
        super().__init__()
        if state_strategy not in STATE_STRATEGIES:
            raise UserError(f"state_strategy {state_strategy!r} is not one of {STATE_STRATEGIES}")
        if state_strategy in ROW_STRATEGIES and (next_state or use_labels):
            raise UserError(
                f"data.init_args.state_strategy={state_strategy} supports global consistency and AR on the fixed "
                "point only: set next_state and use_labels to false (or use another state_strategy)"
            )
        self.forcing = NoiseSchedule(
            forcing_window, forcing_schedule, forcing_noise_min, forcing_noise_max, forcing_synthesise, forcing_levels
        )
        if state_strategy == "jacobi_forcing" and max_length < 2 * n + 1:
            raise UserError(f"max_length ({max_length}) must exceed 2n = {2 * n} with state_strategy=jacobi_forcing")
        if pack_states < 1:
            raise UserError(f"data.init_args.pack_states must be at least 1, not {pack_states}")
        if model is None:
            raise UserError("data.init_args.model is not set (under `cllm fit` it follows model.init_args.model)")
        n, self.n_source = block_size(path, n)
        if max_length <= n:
            raise UserError(f"max_length ({max_length}) must be larger than the block size n ({n})")
        for key, value in (("n", n), ("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value < 1:
                raise UserError(f"data.init_args.{key} must be at least 1, not {value}")
        if collect_shard_size < 1:
            raise UserError(f"data.init_args.collect_shard_size must be at least 1, not {collect_shard_size}")
        if n > max_new_tokens:
            raise UserError(
                f"data.init_args.n ({n}) is larger than data.init_args.max_new_tokens ({max_new_tokens}): "
                "each prompt would give one block past its generation budget; set max_new_tokens >= n"
            )
        # `model` stays out of the hparams: the module logs its own `model`, and Lightning refuses module and data
        # hparams that share a key with different values (training one model on another's trajectories is fine as
        # long as the tokenizers match). The trajectories' manifest and the saved config keep it.
        self.save_hyperparameters(ignore=["model"])
        self.path, self.model, self.n, self.chat_template = Path(path), model, n, chat_template
        self.tokenizer = None
        self.manifest: dict | None = None
        self._samples: dict[bool, array] = {}

    @property
    def masked_batches(self) -> bool:
        """Whether batches carry a 4D may-attend mask (packed and Jacobi Forcing rows), which flash-attn cannot take."""
        return self.hparams.state_strategy in ROW_STRATEGIES

    def prepare_data(self) -> None:
        """Collect the trajectories (one process, batched) when the folder has no manifest yet."""
        if (self.path / MANIFEST_NAME).is_file():
            return
        h = self.hparams
        rank_zero_info(f"{self.path} has no manifest.json: collecting trajectories of {self.model} on {h.prompts}")
        run_collection(
            CollectSettings(
                model=self.model,
                prompts=h.prompts,
                output=str(self.path),
                n=h.n,
                max_new_tokens=h.max_new_tokens,
                batch_size=h.collect_batch_size,
                limit=h.prompt_limit,
                init=h.init,
                shard_size=h.collect_shard_size,
                dtype=h.collect_dtype,
                seed=h.seed,
                chat_template=h.chat_template,
                labels=h.use_labels,
            )
        )

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        self.tokenizer = load_tokenizer(self.model)
        manifest = read_manifest(self.path)
        check_tokenizer(manifest, tokenizer_fingerprint(self.tokenizer), self.path, self.model)
        if manifest["n"] != self.n:  # collected by prepare_data after __init__ read no manifest: the same n
            raise UserError(f"{self.path / MANIFEST_NAME}: block size n={manifest['n']}, the data module n={self.n}")
        if "imported_from" not in manifest:  # an import was not made by any config: only tokenizer and n apply
            h = self.hparams
            asked = {"prompts": h.prompts, "max_new_tokens": h.max_new_tokens, "chat_template": h.chat_template}
            if h.prompt_limit is not None:  # else a folder of 256 prompts would train a config asking for 768
                asked["prompt_limit"] = h.prompt_limit
            check_collection_settings(manifest, {**asked, "init": h.init, "model": self.model}, self.path)
            check_model_fingerprint(manifest, weights_fingerprint(self.model), self.path, self.model)
        verify_checksums(self.path, manifest)
        self.vocab_size = max(len(self.tokenizer), self.tokenizer.vocab_size)
        self.manifest = manifest
        self._scan()

    def _scan(self) -> None:
        """Per record: prompt hash and sample count (from the cache when the shards are unchanged)."""
        h = self.hparams
        shards = self.manifest["shards"]
        key = json.dumps([[s["file"], s["records"], s.get("sha256")] for s in shards])
        key += f"|{h.state_strategy}|{h.next_state}|{h.max_length}|{self.n}"
        cacheable = all(s.get("sha256") for s in shards)  # the checksums identify the shards' content
        hashes, counts, truncated = cached_scan(self.path, key, cacheable, self._scan_lines)
        total = len(hashes)
        # A small dataset may have no prompt below val_fraction: then hold out the lowest-hashed prompt, so the
        # validation loop (and the accepted-tokens callback with it) still runs.
        self.val_threshold = h.val_fraction
        if h.val_fraction > 0 and hashes and min(hashes) >= h.val_fraction:
            self.val_threshold = math.nextafter(min(hashes), 1.0)
        self._samples = {
            held_out: array("H", (c if (x < self.val_threshold) == held_out else 0 for x, c in zip(hashes, counts)))
            for held_out in (False, True)
        }
        if truncated:
            rank_zero_warn(
                f"{truncated} of {total} records have contexts longer than max_length - n = {h.max_length - self.n} "
                "tokens; their oldest tokens are dropped"
            )
        self.truncated_records = truncated

    def _scan_lines(self, hashes: array, counts: array) -> int:
        """One pass over every line: validates it (file:line:field errors), fills hashes and sample counts,
        returns the number of contexts longer than max_length - n."""
        h = self.hparams
        truncated = 0
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            lines, forcing_records = 0, []
            for number, line in iter_lines(path):
                record = parse_record(line, f"{path}:{number}", self.n)
                check_token_ids(record, self.vocab_size, f"{path}:{number}")
                hashes.append(unit_hash(record.prompt_id))
                if h.state_strategy == "jacobi_forcing":  # counted per prompt below (a shard holds whole prompts)
                    forcing_records.append(record)
                else:
                    counts.append(samples_per_record(record, h.state_strategy, h.next_state))
                truncated += len(record.context) > h.max_length - self.n
                lines += 1
            counts.extend(forcing_samples_per_line(forcing_records, self.n, h.max_length))
            if lines != shard["records"]:
                raise UserError(f"{path}: {lines} records, the manifest says {shard['records']}; the shard changed")
        return truncated

    def _loader(self, validation: bool) -> DataLoader:
        h = self.hparams
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = TrajectoryStream(
            self.path,
            self.manifest["shards"],
            n=self.n,
            validation=validation,
            val_fraction=self.val_threshold,
            strategy=h.state_strategy,
            next_state=h.next_state,
            pack_states=h.pack_states,
            shuffle=not validation,
            shuffle_buffer=h.shuffle_buffer,
            seed=h.seed,
            rank=rank,
            world_size=world,
            samples_per_line=self._samples[validation] if h.even_batches else None,
            batch_size=h.batch_size,
            forcing=self.forcing,
            max_length=h.max_length,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        stream.num_workers = max(h.num_workers, 1)
        shapes = {"pad_id": self.tokenizer.pad_token_id or 0, "n": self.n, "max_length": h.max_length}
        if h.state_strategy == "pack":
            collate_fn = partial(collate_packed, **shapes)
        elif h.state_strategy == "jacobi_forcing":
            collate_fn = partial(collate_forcing, pad_id=shapes["pad_id"], n=self.n)
        else:
            collate_fn = partial(collate, **shapes, next_state=h.next_state, use_labels=h.use_labels)
        loader = EpochDataLoader(stream, batch_size=h.batch_size, num_workers=h.num_workers, collate_fn=collate_fn)
        if trainer is not None and not validation:
            loader.epoch_fn = lambda: self.trainer.current_epoch
            # `processed` counts the batches trained on in this epoch, at every point where a checkpoint is saved.
            loader.trained_fn = lambda: self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return loader

    def train_dataloader(self) -> DataLoader:
        if not any(self._samples[False]):
            raise UserError(f"{self.path}: no training samples (every record held out or without non-final states)")
        return self._loader(validation=False)

    def val_dataloader(self) -> DataLoader:
        return self._loader(validation=True)

    def validation_prompts(self) -> list[Prompt]:
        """The held-out prompts the accepted-tokens callback Jacobi-decodes."""
        return load_prompts(self.hparams.val_prompts, limit=self.hparams.val_prompt_limit)

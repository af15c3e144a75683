"""Streaming trajectory records as training samples: rank x worker split, shuffle buffer, state picking, collation.

Records are never loaded whole: each (rank, dataloader worker) pair reads the shards line by line and keeps the
records whose global index i satisfies i % consumers == consumer, so every record is seen exactly once per
epoch. A shuffle buffer (seeded by seed and epoch) mixes them. With even batches every consumer yields the
same number of full batches (a few samples repeated, counted) so ranks never wait on each other at an epoch's
end; the per-record sample counts for that come from the data module's setup scan.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cllm.data_modules.records import Record, iter_lines, parse_record
from cllm.errors import UserError

STATE_STRATEGIES = ("uniform", "all", "noise")


def prompt_hash(prompt_id: str) -> float:
    """A prompt id's place in [0, 1): the held-out split takes hashes below the validation threshold."""
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") / 2**64


def is_validation(prompt_id: str, threshold: float) -> bool:
    """Held-out split by a hash of the prompt id: all blocks of a prompt land on the same side."""
    return prompt_hash(prompt_id) < threshold


def candidate_states(record: Record, next_state: bool) -> list[tuple[list[int], list[int] | None]]:
    """Non-final states with their next state; augmented states have no next state, so only without it."""
    pairs = [(record.states[i], record.states[i + 1]) for i in range(len(record.states) - 1)]
    if not next_state:
        pairs += [(state, None) for state in record.augmented_states]
    return pairs


def noise_ratio(state: list[int], fixed_point: list[int]) -> float:
    return sum(a != b for a, b in zip(state, fixed_point)) / max(len(fixed_point), 1)


def pick_states(record: Record, strategy: str, next_state: bool, rng: random.Random) -> list[tuple]:
    """`uniform`: one non-final state uniformly (official); `all`: every one; `noise`: the state whose noise
    ratio (share of tokens differing from the fixed point) is nearest to r ~ U(0, 1)."""
    pairs = candidate_states(record, next_state)
    if not pairs or strategy == "all":
        return pairs
    if strategy == "uniform":
        return [pairs[rng.randrange(len(pairs))]]
    target = rng.random()
    return [min(pairs, key=lambda pair: abs(noise_ratio(pair[0], record.fixed_point) - target))]


def samples_per_record(record: Record, strategy: str, next_state: bool) -> int:
    count = len(candidate_states(record, next_state))
    return count if strategy == "all" else min(count, 1)


class TrajectoryStream(IterableDataset):
    """The samples of one split for one rank, spread over this rank's dataloader workers."""

    def __init__(
        self,
        folder: Path,
        shards: list[dict],
        *,
        n: int,
        validation: bool,
        val_fraction: float,
        strategy: str = "uniform",
        next_state: bool = False,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        samples_per_line: array | None = None,
        batch_size: int = 1,
    ) -> None:
        self.folder, self.shards, self.n = Path(folder), shards, n
        self.validation, self.val_fraction = validation, val_fraction
        self.strategy, self.next_state = strategy, next_state
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.samples_per_line = samples_per_line  # per global line: samples of this split (None: no evening)
        self.batch_size = batch_size
        self.epoch = 0
        self.repeated_samples = 0

    def consumer(self) -> tuple[int, int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * workers + worker, self.world_size * workers, workers

    def target_samples(self, consumers: int) -> int:
        """Samples every consumer yields with evening: the largest share, rounded up to full batches."""
        counts = [sum(self.samples_per_line[c::consumers]) for c in range(consumers)]
        return -(-max(counts) // self.batch_size) * self.batch_size

    def __len__(self) -> int:
        if self.samples_per_line is None:
            raise TypeError("length is known only with even batches")
        info = get_worker_info()
        workers = info.num_workers if info else getattr(self, "num_workers", 1)
        return workers * self.target_samples(self.world_size * workers)

    def records(self, consumer: int, consumers: int) -> Iterator[tuple[int, Record]]:
        """(global index, record) of this consumer's share, shards in a per-epoch order when shuffling."""
        offsets, total = [], 0
        for shard in self.shards:
            offsets.append(total)
            total += shard["records"]
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(f"{self.seed}/{self.epoch}/shards").shuffle(order)
        for s in order:
            path = self.folder / self.shards[s]["file"]
            for position, (number, line) in enumerate(iter_lines(path)):
                index = offsets[s] + position
                if index % consumers != consumer:
                    continue  # another rank/worker's record: skipped before parsing
                record = parse_record(line, f"{path}:{number}", self.n)
                if is_validation(record.prompt_id, self.val_fraction) == self.validation:
                    yield index, record

    def samples(self, consumer: int, consumers: int) -> Iterator[dict]:
        for index, record in self.records(consumer, consumers):
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            for state, next_state in pick_states(record, self.strategy, self.next_state, rng):
                yield {"record": record, "state": state, "next_state": next_state, "index": index}

    def __iter__(self) -> Iterator[dict]:
        consumer, consumers, _ = self.consumer()
        stream = self.samples(consumer, consumers)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = shuffled(stream, self.shuffle_buffer, random.Random(f"{self.seed}/{self.epoch}/{consumer}"))
        if self.samples_per_line is None:
            yield from stream
            return
        target, first, count = self.target_samples(consumers), [], 0
        for sample in stream:
            count += 1
            if len(first) < self.batch_size * 2:
                first.append(sample)
            yield sample
        # Even batches: fill up with repeats of the first samples, so all consumers yield `target` samples.
        for i in range(target - count):
            self.repeated_samples += 1
            yield first[i % len(first)]


def shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """Buffer shuffle: keep `size` items, emit a random one as each new item arrives (memory bounded by size)."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def collate(samples: list[dict], *, pad_id: int, n: int, max_length: int, next_state: bool, use_labels: bool) -> dict:
    """Right-padded batch sharing one attention mask (see docs/data.md for the contract)."""
    keep = max_length - n  # context budget: over-long contexts lose their oldest tokens
    contexts, prompt_lengths = [], []
    for sample in samples:
        record = sample["record"]
        context = record.context
        cut = max(len(context) - keep, 0)
        contexts.append(context[cut:])
        prompt_lengths.append(max(len(record.prompt_ids) - cut, 0))
    width = max(len(c) for c in contexts) + n

    def padded(rows: list[list[int]], fill: int, size: int) -> torch.Tensor:
        return torch.tensor([row + [fill] * (size - len(row)) for row in rows], dtype=torch.long)

    batch = {
        "input_ids": padded([c + s["state"] for c, s in zip(contexts, samples)], pad_id, width),
        "fixed_point_ids": padded([c + s["record"].fixed_point for c, s in zip(contexts, samples)], pad_id, width),
        "attention_mask": padded([[1] * (len(c) + n) for c in contexts], 0, width),
        "block_start": torch.tensor([len(c) for c in contexts], dtype=torch.long),
        "prompt_length": torch.tensor(prompt_lengths, dtype=torch.long),
    }
    if next_state:
        batch["next_state_ids"] = padded([c + s["next_state"] for c, s in zip(contexts, samples)], pad_id, width)
    if use_labels:
        labels = []
        for sample in samples:
            record = sample["record"]
            if record.labels is None:
                raise UserError(f"use_labels is on but record {record.prompt_id!r} block {record.block_index} has none")
            labels.append((record.prompt_ids + record.labels)[-max_length:])
        span = max(len(label) for label in labels)
        batch["labels_ids"] = padded(labels, -100, span)
        batch["labels_attention_mask"] = padded([[1] * len(label) for label in labels], 0, span)
    return batch


class EpochDataLoader(DataLoader):
    """Tells the stream which epoch starts (for its shuffle) each time an epoch's iteration begins."""

    epoch_fn = None

    def __iter__(self):
        dataset = self.dataset
        dataset.epoch = self.epoch_fn() if self.epoch_fn is not None else dataset.epoch + int(self._started)
        self._started = True
        return super().__iter__()

    _started = False

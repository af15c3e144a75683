"""Streaming trajectory records as training samples: rank x worker split, shuffle buffer, state picking, collation.

Records are never loaded whole: each (rank, dataloader worker) pair reads the shards line by line and keeps the
records whose global index i satisfies i % consumers == consumer, so every record is seen exactly once per
epoch. A shuffle buffer (seeded by seed and epoch) mixes them. With even batches every consumer yields the
same number of full batches (a few samples repeated, counted) so ranks never wait on each other at an epoch's
end; the per-record sample counts for that come from the data module's setup scan.

With the `pack` strategy one record gives one sample holding k of its states, collated into one packed row
(`collate_packed`): the context is shared by the fixed point and the k states (see docs/data.md).
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cllm.data_modules.records import Record, iter_lines, parse_record
from cllm.errors import UserError

STATE_STRATEGIES = ("uniform", "all", "noise", "pack")


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


def pick_states(
    record: Record, strategy: str, next_state: bool, rng: random.Random, pack_states: int = 4
) -> list[tuple]:
    """`uniform`: one non-final state uniformly (official); `all`: every one; `noise`: the state whose noise
    ratio (share of tokens differing from the fixed point) is nearest to r ~ U(0, 1); `pack`: `pack_states`
    states uniformly without replacement (all of them when the record has fewer)."""
    pairs = candidate_states(record, next_state)
    if not pairs or strategy == "all":
        return pairs
    if strategy == "uniform":
        return [pairs[rng.randrange(len(pairs))]]
    if strategy == "pack":
        return rng.sample(pairs, min(pack_states, len(pairs)))
    target = rng.random()
    return [min(pairs, key=lambda pair: abs(noise_ratio(pair[0], record.fixed_point) - target))]


def samples_per_record(record: Record, strategy: str, next_state: bool) -> int:
    """Samples a record gives per epoch: one per state with `all`, else one (a packed record is one sample)."""
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
        pack_states: int = 4,
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
        self.strategy, self.next_state, self.pack_states = strategy, next_state, pack_states
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
            picked = pick_states(record, self.strategy, self.next_state, rng, self.pack_states)
            if self.strategy == "pack":
                if picked:  # the whole pack is one sample: one record, one packed row
                    yield {"record": record, "states": [state for state, _ in picked], "index": index}
                continue
            for state, next_state in picked:
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


def truncated_contexts(samples: list[dict], n: int, max_length: int) -> tuple[list[list[int]], list[int]]:
    """Each sample's context cut to the last max_length - n tokens, and the prompt tokens left in it."""
    keep = max_length - n  # context budget: over-long contexts lose their oldest tokens
    contexts, prompt_lengths = [], []
    for sample in samples:
        record = sample["record"]
        context = record.context
        cut = max(len(context) - keep, 0)
        contexts.append(context[cut:])
        prompt_lengths.append(max(len(record.prompt_ids) - cut, 0))
    return contexts, prompt_lengths


def padded(rows: list[list[int]], fill: int, size: int) -> torch.Tensor:
    """[len(rows), size] long tensor, each row right-padded with `fill`."""
    return torch.tensor([row + [fill] * (size - len(row)) for row in rows], dtype=torch.long)


def collate(samples: list[dict], *, pad_id: int, n: int, max_length: int, next_state: bool, use_labels: bool) -> dict:
    """Right-padded batch sharing one attention mask (see docs/data.md for the contract)."""
    contexts, prompt_lengths = truncated_contexts(samples, n, max_length)
    width = max(len(c) for c in contexts) + n
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


def collate_packed(samples: list[dict], *, pad_id: int, n: int, max_length: int) -> dict:
    """One row per record: ctx + y* + s_1 + ... + s_k, each segment attending to ctx and causally to itself only.

    Positions restart at len(ctx) for y* and for every state, so each segment sees exactly what it sees unpacked.
    The context keeps the unpacked budget of max_length - n tokens (rows may be longer than max_length).
    Segment ids: 0 context, 1 fixed point, 1 + j state j, -1 padding; padding keys are seen by no real token.
    """
    contexts, prompt_lengths = truncated_contexts(samples, n, max_length)
    most_states = max(len(sample["states"]) for sample in samples)
    rows, positions, segments, segment_starts = [], [], [], []
    for context, sample in zip(contexts, samples):
        parts = [sample["record"].fixed_point, *sample["states"]]
        rows.append(context + [token for part in parts for token in part])
        block_positions = list(range(len(context), len(context) + n))
        positions.append(list(range(len(context))) + block_positions * len(parts))
        segments.append([0] * len(context) + [1 + j for j in range(len(parts)) for _ in range(n)])
        starts = [len(context) + n * j for j in range(1, len(parts))]
        segment_starts.append(starts + [-1] * (most_states - len(starts)))
    width = max(len(row) for row in rows)
    segment = padded(segments, -1, width)
    query_segment, key_segment = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # may attend[b, q, k] = k <= q and (k in the context or k in q's own segment)
    may_attend = causal & ((key_segment == 0) | (key_segment == query_segment))
    return {
        "input_ids": padded(rows, pad_id, width),
        "position_ids": padded(positions, 0, width),
        "attention_mask": may_attend[:, None],
        "fixed_point_mask": padded([[1] * (len(c) + n) for c in contexts], 0, width),
        "block_start": torch.tensor([len(c) for c in contexts], dtype=torch.long),
        "segment_starts": torch.tensor(segment_starts, dtype=torch.long),
        "prompt_length": torch.tensor(prompt_lengths, dtype=torch.long),
    }


class EpochDataLoader(DataLoader):
    """A DataLoader over a TrajectoryStream that tells the stream which epoch starts (for its shuffle) each time an
    epoch's iteration begins, and that resumes mid-epoch.

    The stream's order is a pure function of (seed, epoch), so a checkpoint needs only (epoch, batches already
    trained on): Lightning stores `state_dict()` in every checkpoint and hands it to `load_state_dict()` on resume,
    and the next iteration of that epoch skips those batches. A resumed run then trains on the same batches, in the
    same order, as an uninterrupted one.
    """

    epoch_fn: Callable[[], int] | None = None  # the trainer's current epoch; without it, iterations are counted
    trained_fn: Callable[[], int] | None = None  # batches of the current epoch already trained on
    _started = False
    _resume: dict | None = None

    def __iter__(self):
        dataset = self.dataset
        dataset.epoch = self.epoch_fn() if self.epoch_fn is not None else dataset.epoch + int(self._started)
        self._started = True
        iterator = super().__iter__()
        resume, self._resume = self._resume, None
        if resume is not None and resume["epoch"] == dataset.epoch:
            deque(islice(iterator, resume["batches"]), maxlen=0)  # already trained on before the checkpoint
        return iterator

    def state_dict(self) -> dict[str, int]:
        """Where training stands in the stream (without a trainer: the start of the current epoch)."""
        return {"epoch": self.dataset.epoch, "batches": self.trained_fn() if self.trained_fn is not None else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)

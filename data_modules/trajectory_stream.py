"""Streaming trajectory records as training samples: rank x worker split, shuffle buffer, state picking.

Records are never loaded whole: each (rank, dataloader worker) pair reads the shards line by line and keeps the
records whose global index i satisfies i % consumers == consumer, so every record is seen exactly once per
epoch. A shuffle buffer (seeded by seed and epoch) mixes them. With even batches every consumer yields the
same number of full batches (a few samples repeated, counted) so ranks never wait on each other at an epoch's
end; the per-record sample counts for that come from the data module's setup scan.

With the `pack` strategy one record gives one sample holding k of its states, collated into one packed row
(`cllm.data_modules.collate.collate_packed`): the context is shared by the fixed point and the k states (see
docs/data.md). Samples become batches in `cllm.data_modules.collate`. With
`jacobi_forcing` the unit is a prompt: its consecutive records (all blocks of its response) give one sample per
row (`cllm.data_modules.jacobi_forcing`); each consumer reads every line and keeps the prompts whose first record's
index falls to it.
"""

from __future__ import annotations

import random
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cllm.data_modules.jacobi_forcing import noise_ratio
from cllm.files import iter_lines, unit_hash
from cllm.records import Record, parse_record

STATE_STRATEGIES = ("uniform", "all", "noise", "pack", "jacobi_forcing")
ROW_STRATEGIES = ("pack", "jacobi_forcing")  # several states per row: a 4D may-attend mask, fixed-point targets only


def is_validation(prompt_id: str, threshold: float) -> bool:
    """Held-out split by a hash of the prompt id in [0, 1): all blocks of a prompt land on the same side."""
    return unit_hash(prompt_id) < threshold


def candidate_states(record: Record, next_state: bool) -> list[tuple[list[int], list[int] | None]]:
    """Non-final states with their next state; augmented states have no next state, so only without it."""
    pairs = [(record.states[i], record.states[i + 1]) for i in range(len(record.states) - 1)]
    if not next_state:
        pairs += [(state, None) for state in record.augmented_states]
    return pairs


def pick_states(
    record: Record, strategy: str, next_state: bool, rng: random.Random, pack_states: int = 4
) -> list[tuple]:
    """`uniform`: one non-final state uniformly (official); `all`: every one; `noise`: the state whose noise
    ratio (`jacobi_forcing.noise_ratio`: the share of the block from its first wrong token on, the one
    definition of the project) is nearest to r ~ U(0, 1); `pack`: `pack_states`
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
        forcing=None,
        max_length: int = 1024,
        eos_token_id: int | None = None,
    ) -> None:
        self.folder, self.shards, self.n = Path(folder), shards, n
        self.validation, self.val_fraction = validation, val_fraction
        self.strategy, self.next_state, self.pack_states = strategy, next_state, pack_states
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.samples_per_line = samples_per_line  # per global line: samples of this split (None: no evening)
        self.batch_size = batch_size
        self.forcing, self.max_length, self.eos_token_id = forcing, max_length, eos_token_id  # jacobi_forcing only
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
        if self.strategy == "jacobi_forcing":
            yield from self.forcing_samples(consumer, consumers)
            return
        for index, record in self.records(consumer, consumers):
            rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
            picked = pick_states(record, self.strategy, self.next_state, rng, self.pack_states)
            if self.strategy == "pack":
                if picked:  # the whole pack is one sample: one record, one packed row
                    yield {"record": record, "states": [state for state, _ in picked], "index": index}
                continue
            for state, next_state in picked:
                yield {"record": record, "state": state, "next_state": next_state, "index": index}

    def forcing_samples(self, consumer: int, consumers: int) -> Iterator[dict]:
        """One sample per Jacobi Forcing row of this consumer's prompts (whole responses, split by max_length)."""
        from cllm.data_modules.jacobi_forcing import build_row, prompt_groups, row_spans

        for first, group in prompt_groups(self.records(0, 1)):
            if first % consumers != consumer:
                continue
            records = [record for _, record in group]
            for number, (start, stop) in enumerate(row_spans(records, self.n, self.max_length)):
                rng = random.Random(f"{self.seed}/{self.epoch}/{first}/{number}")
                row = build_row(
                    records[start:stop],
                    self.forcing,
                    rng,
                    n=self.n,
                    max_length=self.max_length,
                    eos_token_id=self.eos_token_id,
                    first=start == 0,
                )
                yield {"row": row, "index": first}

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

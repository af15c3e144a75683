"""Jacobi Forcing rows (arXiv 2512.14681): every block of a response in one row, noisy earlier blocks as context.

One row per prompt (or per window of consecutive blocks when the response does not fit `max_length`):

    context | noisy_j0 fixed_j0 | noisy_j0+1 fixed_j0+1 | ...

`context` is the first block's context (the prompt + the fixed points of the blocks before the window), `fixed_j`
is block j's fixed point and `noisy_j` one state of its trajectory picked by the noise schedule. Both halves of a
pair carry the same positions, those of block j unpacked. Who sees whom (`may_attend`, all causal inside a block):

    context  -> context
    fixed_j  -> context, fixed_i (i < j)
    noisy_j  -> context, fixed_i of earlier noise windows, noisy_i (i < j) of its own window

Noise windows are the blocks `block_index // window`. A state's noise ratio is (n - first index differing from
the fixed point) / n; block j targets `linspace(noise_min, noise_max, window)[j % window]` (`progressive`), the
same grid rotated by a phase drawn per row and epoch (`shifted`: entry (j + phase) % window), or a random entry of
it (`random`), and takes the state nearest that ratio (the fixed point itself is a candidate:
ratio 0, no consistency term). Tokens after an EOS inside a block are padding: no real token attends to them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from cllm.data_modules.collate import padded
from cllm.errors import UserError
from cllm.records import Record

SCHEDULES = ("progressive", "shifted", "random")
CONTEXT, NOISY, FIXED, PADDING = 0, 1, 2, -1  # token kinds of a row


@dataclass(frozen=True)
class NoiseSchedule:
    """Which state of each block goes into its noisy half.

    Args:
        window: blocks per noise window (JF's `w`): noisy blocks see the noisy blocks before them in theirs.
        schedule: `progressive` (block j targets ratio grid[j % window], JF's default), `shifted` (grid[(j + phase)
            % window], the phase drawn per row and epoch: the ramp of `progressive`, but every block meets every
            ratio over the epochs instead of the same pair each epoch) or `random` (a random entry per block).
        noise_min, noise_max: ends of the ratio grid `linspace(noise_min, noise_max, levels)`.
        levels: points of that grid; None: `window` (JF). Only `random` may take another count: with `window=1`
            every noisy block sees the clean blocks before it (as in a one-block decoder, plain Jacobi or
            recycling) and still draws its ratio from `levels` points.
        synthesise: when the nearest state's ratio is more than 1/n away from the target, build a state at the
            target instead: the fixed point up to the target index, then tokens drawn from the context.
    """

    window: int = 4
    schedule: str = "progressive"
    noise_min: float = 0.0
    noise_max: float = 1.0
    synthesise: bool = False
    levels: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"data.init_args.forcing_schedule must be one of {SCHEDULES}, not {self.schedule!r}")
        if self.window < 1:
            raise UserError(f"data.init_args.forcing_window must be at least 1, not {self.window}")
        if not 0.0 <= self.noise_min <= self.noise_max <= 1.0:
            raise UserError(
                f"data.init_args.forcing_noise_min/max must satisfy 0 <= min <= max <= 1, not "
                f"{self.noise_min}, {self.noise_max}"
            )
        if self.levels is not None and self.levels < 1:
            raise UserError(f"data.init_args.forcing_levels must be at least 1, not {self.levels}")
        if self.levels not in (None, self.window) and self.schedule != "random":
            raise UserError(
                f"data.init_args.forcing_levels={self.levels} needs forcing_schedule=random: the {self.schedule} "
                f"schedule gives block j the grid point j % forcing_window, so its grid has forcing_window points"
            )

    def target_ratio(self, block_index: int, rng: random.Random, phase: int = 0) -> float:
        """The noise ratio block `block_index` targets (`phase`: the row's rotation of the grid, `shifted`)."""
        grid = torch.linspace(self.noise_min, self.noise_max, self.levels or self.window).tolist()
        if self.schedule == "random":
            return grid[rng.randrange(len(grid))]
        return grid[(block_index + (phase if self.schedule == "shifted" else 0)) % self.window]

    def row_phase(self, rng: random.Random) -> int:
        """The grid rotation of one row (drawn once per row, so that its blocks still ramp; 0 unless `shifted`)."""
        return rng.randrange(self.window) if self.schedule == "shifted" else 0


@dataclass
class ForcingPair:
    """Block j of a row: its noisy state and fixed point, and how many of their tokens are real (through EOS)."""

    noisy: list[int]
    fixed: list[int]
    length: int  # real tokens: through the first EOS, else n
    window: int
    ends: bool = False  # the block holds an EOS (the response ends in it)

    @property
    def scored(self) -> int:
        """Offsets t of the block whose logit predicts a real token: all n, or up to the EOS (exclusive)."""
        return self.length - 1 if self.ends else len(self.fixed)


@dataclass
class ForcingRow:
    context: list[int]
    prompt_length: int  # prompt tokens left in `context` (after any left truncation)
    continues: bool  # the row continues a response whose earlier blocks an earlier row trained on
    pairs: list[ForcingPair] = field(default_factory=list)


def first_difference(state: list[int], fixed_point: list[int]) -> int:
    """Index of the first token where `state` differs from `fixed_point`; len(fixed_point) when equal."""
    return next((i for i, (a, b) in enumerate(zip(state, fixed_point)) if a != b), len(fixed_point))


def noise_ratio(state: list[int], fixed_point: list[int]) -> float:
    """(n - first differing index) / n: 0 for the fixed point, 1 when even the first token is wrong."""
    n = len(fixed_point)
    return (n - first_difference(state, fixed_point)) / max(n, 1)


def pick_noisy_state(record: Record, target: float, rng: random.Random, synthesise: bool = False) -> list[int]:
    """The state of `record` (fixed point and augmented states included) whose noise ratio is nearest `target`
    (the earliest on ties); with `synthesise`, a made-up state at the target when none is within 1/n."""
    fixed = record.fixed_point
    candidates = record.states + record.augmented_states
    best = min(candidates, key=lambda state: abs(noise_ratio(state, fixed) - target))
    n = len(fixed)
    if not synthesise or abs(noise_ratio(best, fixed) - target) <= 1 / n:
        return best
    keep = n - round(target * n)  # the first differing index of a state at ratio `target`
    pool = record.context or fixed
    tail = [pool[rng.randrange(len(pool))] for _ in range(n - keep)]
    if tail[0] == fixed[keep]:  # the state must differ at `keep`: take another context token there
        others = [token for token in pool if token != fixed[keep]]
        if not others:
            return best
        tail[0] = others[rng.randrange(len(others))]
    return fixed[:keep] + tail


def eos_end(fixed_point: list[int], eos_token_id: int | None) -> int | None:
    """Tokens of a block up to and including its first EOS; None without one."""
    if eos_token_id is not None and eos_token_id in fixed_point:
        return fixed_point.index(eos_token_id) + 1
    return None


def continues(previous: Record, record: Record, n: int) -> bool:
    """Whether `record` is the block right after `previous` (same prompt, its context ends with previous's y*)."""
    return (
        record.prompt_id == previous.prompt_id
        and record.block_index == previous.block_index + 1
        and len(record.prefix_ids) == len(previous.prefix_ids) + n
        and record.prefix_ids[-n:] == previous.fixed_point
    )


def row_spans(records: list[Record], n: int, max_length: int) -> list[tuple[int, int]]:
    """Split one prompt's consecutive records into rows [start, stop): a row holds as many pairs as fit in
    max_length after its context (at least one; its context is cut from the left to fit one), and a gap in the
    trajectory (a dropped block) starts a new row."""
    spans, start = [], 0
    for k in range(1, len(records) + 1):
        if k == len(records):
            spans.append((start, k))
            break
        context = min(len(records[start].context), max_length - 2 * n)
        full = context + 2 * n * (k - start + 1) > max_length
        if full or not continues(records[k - 1], records[k], n):
            spans.append((start, k))
            start = k
    return spans


def build_row(
    records: list[Record],
    schedule: NoiseSchedule,
    rng: random.Random,
    *,
    n: int,
    max_length: int,
    eos_token_id: int | None,
    first: bool = True,
) -> ForcingRow:
    """One row from consecutive records of a prompt (one span of `row_spans`)."""
    context = records[0].context
    cut = max(len(context) - (max_length - 2 * n), 0)
    row = ForcingRow(context[cut:], max(len(records[0].prompt_ids) - cut, 0), continues=not first)
    phase = schedule.row_phase(rng)
    for record in records:
        target = schedule.target_ratio(record.block_index, rng, phase)
        noisy = pick_noisy_state(record, target, rng, schedule.synthesise)
        end = eos_end(record.fixed_point, eos_token_id)
        length = n if end is None else end
        window = record.block_index // schedule.window
        row.pairs.append(ForcingPair(noisy, record.fixed_point, length, window, ends=end is not None))
    return row


def samples_per_line(records: list[Record], n: int, max_length: int) -> list[int]:
    """Per record: the rows it starts (for even batches; a prompt's rows are counted on its first record)."""
    counts = [0] * len(records)
    for first, group in prompt_groups(list(enumerate(records))):
        counts[first] = len(row_spans([record for _, record in group], n, max_length))
    return counts


def prompt_groups(indexed: Iterable[tuple[int, Record]]) -> Iterator[tuple[int, list[tuple[int, Record]]]]:
    """Consecutive records of the same prompt: yields (index of the first, [(index, record), ...])."""
    group: list[tuple[int, Record]] = []
    for item in indexed:
        if group and item[1].prompt_id != group[-1][1].prompt_id:
            yield group[0][0], group
            group = []
        group.append(item)
    if group:
        yield group[0][0], group


def row_layout(row: ForcingRow, n: int) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Per token of the row: ids, position, kind (CONTEXT/NOISY/FIXED/PADDING), pair index, noise window."""
    c = len(row.context)
    ids, positions = list(row.context), list(range(c))
    kinds, pairs, windows = [CONTEXT] * c, [-1] * c, [-1] * c
    for p, pair in enumerate(row.pairs):
        for kind, tokens in ((NOISY, pair.noisy), (FIXED, pair.fixed)):
            ids += tokens
            positions += range(c + p * n, c + (p + 1) * n)
            kinds += [kind] * pair.length + [PADDING] * (n - pair.length)  # after EOS: padding
            pairs += [p] * n
            windows += [pair.window] * n
    return ids, positions, kinds, pairs, windows


def may_attend(kinds: torch.Tensor, pairs: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool from per-token kind, pair and window [B, L] (rules in the module docstring). Padding
    tokens see only themselves (no NaN rows) and are seen by nobody else."""
    width = kinds.shape[1]
    q_kind, k_kind = kinds[:, :, None], kinds[:, None, :]
    q_pair, k_pair = pairs[:, :, None], pairs[:, None, :]
    q_window, k_window = windows[:, :, None], windows[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    own_block = (q_pair == k_pair) & (q_kind == k_kind) & causal
    context_key = k_kind == CONTEXT
    context_q = (q_kind == CONTEXT) & context_key & causal
    fixed_q = (q_kind == FIXED) & (context_key | ((k_kind == FIXED) & (k_pair < q_pair)) | own_block)
    noisy_context = ((k_kind == FIXED) & (k_window < q_window)) | (
        (k_kind == NOISY) & (k_window == q_window) & (k_pair < q_pair)
    )
    noisy_q = (q_kind == NOISY) & (context_key | noisy_context | own_block)
    padding_q = (q_kind == PADDING) & torch.eye(width, dtype=torch.bool)
    return context_q | fixed_q | noisy_q | padding_q


def ar_labels(row: ForcingRow, n: int) -> list[int]:
    """labels[t] = the token the logit at t - 1 predicts on the clean path, -100 where none (see `labels_nll`).

    Clean path: context -> fixed_0, inside each fixed block, the last token of fixed_{j-1} -> the first of fixed_j;
    nothing after an EOS. A continuation row leaves its context out (the earlier row trained on it).
    """
    c = len(row.context)
    labels = [-100] * (c + 2 * n * len(row.pairs))
    if not row.continues:
        labels[1:c] = row.context[1:]
    previous = c - 1  # the position whose logit predicts the next fixed block's first token
    for p, pair in enumerate(row.pairs):
        fixed_start = c + (2 * p + 1) * n
        # labels_nll scores logit t against labels[t + 1]: the bridge (logit at `previous` -> fixed_p[0]) goes in
        # the slot after `previous`, which is noisy_p's first token, never itself a target.
        labels[previous + 1] = pair.fixed[0]
        for i in range(1, pair.length):
            labels[fixed_start + i] = pair.fixed[i]
        previous = fixed_start + n - 1
    return labels


def collate_forcing(samples: list[dict], *, pad_id: int, n: int) -> dict:
    """Right-padded batch of Jacobi Forcing rows (`sample["row"]`, a ForcingRow).

    Keys: input_ids, position_ids [B, L]; attention_mask [B, 1, L, L] bool (may attend); ar_labels [B, L]
    (`ar_labels`); pair_starts [B, P] (start of noisy_j; fixed_j starts n later; -1 pads); pair_scored [B, P]
    (offsets whose logit predicts a real token, `ForcingPair.scored`); prompt_length, row_length [B].
    """
    rows = [sample["row"] for sample in samples]
    layouts = [row_layout(row, n) for row in rows]
    width = max(len(layout[0]) for layout in layouts)
    most_pairs = max(len(row.pairs) for row in rows)

    def column(index: int, fill: int) -> torch.Tensor:
        return padded([layout[index] for layout in layouts], fill, width)

    kinds, pairs, windows = column(2, PADDING), column(3, -1), column(4, -1)
    starts = [[len(row.context) + 2 * n * p for p in range(len(row.pairs))] for row in rows]
    scored = [[pair.scored for pair in row.pairs] for row in rows]
    return {
        "input_ids": column(0, pad_id),
        "position_ids": column(1, 0),
        "attention_mask": may_attend(kinds, pairs, windows)[:, None],
        "ar_labels": padded([ar_labels(row, n) for row in rows], -100, width),
        "pair_starts": padded(starts, -1, most_pairs),
        "pair_scored": padded(scored, 0, most_pairs),
        "prompt_length": torch.tensor([row.prompt_length for row in rows], dtype=torch.long),
        "row_length": torch.tensor([len(layout[0]) for layout in layouts], dtype=torch.long),
    }

"""Jacobi Forcing rows: the mask against a brute-force reference from the rules, each pair's losses against the
same pair computed alone with its explicit context (float64 tiny model), shared positions, the noise schedule."""

from __future__ import annotations

import random

import pytest
import torch

from cllm import forcing_losses
from cllm.data_modules import jacobi_forcing as jf
from cllm.errors import UserError
from cllm.losses import divergence
from cllm.module import CLLMModule
from cllm.records import Record

EOS = 2


def response(prompt_id: str, prompt: list[int], n: int, blocks: int, generator: torch.Generator, eos_at=None):
    """The records of one prompt: `blocks` consecutive blocks, each with a Jacobi-like trajectory (state t has its
    first t tokens final); with `eos_at`, the last block's fixed point holds EOS at that offset."""
    records, prefix = [], []
    for j in range(blocks):
        fixed = torch.randint(3, 200, (n,), generator=generator).tolist()
        if eos_at is not None and j == blocks - 1:
            fixed[eos_at] = EOS
        states = []
        for t in range(n):
            noise = torch.randint(3, 200, (n,), generator=generator).tolist()
            states.append(fixed[:t] + [x if x != f else x + 1 for x, f in zip(noise[t:], fixed[t:])])
        records.append(Record(prompt_id, j, list(prompt), list(prefix), states + [fixed]))
        prefix += fixed
    return records


def rows_of(records, schedule, n, max_length, seed=0):
    rng = random.Random(seed)
    spans = jf.row_spans(records, n, max_length)
    return [
        jf.build_row(records[a:b], schedule, rng, n=n, max_length=max_length, eos_token_id=EOS, first=a == 0)
        for a, b in spans
    ]


def reference_may_attend(row: jf.ForcingRow, n: int) -> torch.Tensor:
    """may_attend[q, k] written from the rules, one (q, k) at a time, from the row's segments."""
    c = len(row.context)
    segments = [("context", -1, -1, 0, c, c)]  # (kind, pair, window, start, real tokens, size)
    for p, pair in enumerate(row.pairs):
        segments.append(("noisy", p, pair.window, c + 2 * p * n, pair.length, n))
        segments.append(("fixed", p, pair.window, c + (2 * p + 1) * n, pair.length, n))
    where = {}
    for kind, pair, window, start, real, size in segments:
        for i in range(size):
            where[start + i] = (kind if i < real else "padding", pair, window)
    width = len(where)
    mask = torch.zeros(width, width, dtype=torch.bool)
    for q in range(width):
        q_kind, q_pair, q_window = where[q]
        for k in range(width):
            k_kind, k_pair, k_window = where[k]
            same_block = k_kind == q_kind and k_pair == q_pair and k <= q
            if q_kind == "padding":
                allowed = k == q
            elif k_kind == "padding":
                allowed = False
            elif k_kind == "context":
                allowed = k <= q or q_kind != "context"
            elif q_kind == "fixed":
                allowed = (k_kind == "fixed" and k_pair < q_pair) or same_block
            elif q_kind == "noisy":
                earlier_fixed = k_kind == "fixed" and k_window < q_window
                window_mate = k_kind == "noisy" and k_window == q_window and k_pair < q_pair
                allowed = earlier_fixed or window_mate or same_block
            else:
                allowed = False
            mask[q, k] = allowed
    return mask


CASES = [  # (n, blocks, window, max_length, eos_at)
    (2, 1, 1, 64, None),
    (3, 4, 2, 64, None),
    (3, 5, 3, 64, 1),  # EOS inside the last block
    (4, 6, 4, 40, None),  # split into rows by max_length
    (2, 7, 3, 22, 0),  # split, EOS first in the last block
]


@pytest.mark.parametrize(("n", "blocks", "window", "max_length", "eos_at"), CASES)
def test_mask_equals_the_brute_force_reference(n, blocks, window, max_length, eos_at):
    generator = torch.Generator().manual_seed(blocks)
    records = response("a", [1, 5, 6, 7], n, blocks, generator, eos_at)
    rows = rows_of(records, jf.NoiseSchedule(window=window), n, max_length)
    assert sum(len(row.pairs) for row in rows) == blocks
    assert all(len(row.context) + 2 * n * len(row.pairs) <= max_length for row in rows)
    batch = jf.collate_forcing([{"row": row} for row in rows], pad_id=0, n=n)
    for b, row in enumerate(rows):
        width = int(batch["row_length"][b])
        torch.testing.assert_close(batch["attention_mask"][b, 0, :width, :width], reference_may_attend(row, n))
        assert not batch["attention_mask"][b, 0, :width, width:].any()  # nobody real sees the batch padding


def test_windows_split_by_max_length_restart_from_the_prompt_and_earlier_fixed_points():
    n, prompt = 2, [1, 5, 6]
    records = response("a", prompt, n, 6, torch.Generator().manual_seed(0))
    rows = rows_of(records, jf.NoiseSchedule(window=2), n, max_length=15)
    assert [len(row.pairs) for row in rows] == [3, 1, 1, 1]  # 3 + 3 * 4; then contexts of 9, 11, 13 -> 11 tokens
    fixed = [token for record in records for token in record.fixed_point]
    assert rows[1].context == prompt + fixed[:6] and rows[2].context == prompt + fixed[:8]
    assert [row.continues for row in rows] == [False, True, True, True]
    # a context longer than max_length - 2n is cut from the left (the prompt goes first)
    assert rows[3].context == (prompt + fixed[:10])[2:] and rows[3].prompt_length == 1
    assert jf.samples_per_line(records, n, 15) == [4, 0, 0, 0, 0, 0]


def test_a_gap_in_the_trajectory_starts_a_new_row():
    records = response("a", [1, 5], 2, 4, torch.Generator().manual_seed(0))
    del records[1]  # a dropped (cleaned) block
    assert jf.row_spans(records, 2, 100) == [(0, 1), (1, 3)]
    assert jf.samples_per_line(records, 2, 100) == [2, 0, 0]


def test_pairs_share_positions():
    n = 3
    rows = rows_of(response("a", [1, 5], n, 3, torch.Generator().manual_seed(0)), jf.NoiseSchedule(), n, 64)
    batch = jf.collate_forcing([{"row": rows[0]}], pad_id=0, n=n)
    positions = batch["position_ids"][0].tolist()
    assert positions == [0, 1] + [2, 3, 4] * 2 + [5, 6, 7] * 2 + [8, 9, 10] * 2
    starts = batch["pair_starts"][0].tolist()
    assert starts == [2, 8, 14]


def test_progressive_schedule_picks_the_state_nearest_the_target_ratio():
    n = 4
    records = response("a", [1, 5], n, 4, torch.Generator().manual_seed(0))
    schedule = jf.NoiseSchedule(window=4, noise_min=0.0, noise_max=1.0)
    row = rows_of(records, schedule, n, 100)[0]
    # block j targets j / 3: ratios 0, 1/4 or 2/4, 3/4, 1 -> first differing index n - round(ratio * n)
    assert [jf.noise_ratio(pair.noisy, pair.fixed) for pair in row.pairs] == [0.0, 0.25, 0.75, 1.0]
    assert row.pairs[0].noisy == row.pairs[0].fixed  # ratio 0: the fixed point itself
    ratios = {jf.NoiseSchedule(window=4, schedule="random").target_ratio(0, random.Random(s)) for s in range(40)}
    assert len(ratios) == 4


def test_shifted_schedule_rotates_the_ramp_per_row_so_every_block_meets_every_ratio():
    n = 4
    records = response("a", [1, 5], n, 4, torch.Generator().manual_seed(0))
    shifted = jf.NoiseSchedule(window=4, schedule="shifted")
    seen = {}  # phase -> the row's ratios
    for seed in range(40):
        row = jf.build_row(records, shifted, random.Random(seed), n=n, max_length=100, eos_token_id=None)
        ratios = [jf.noise_ratio(pair.noisy, pair.fixed) for pair in row.pairs]
        seen[ratios.index(0.0)] = ratios
    assert len(seen) == 4  # each block got the fixed point (ratio 0) in some row
    progressive = [0.0, 0.25, 0.75, 1.0]  # as in the progressive test: the same ramp, rotated
    for zero_at, ratios in seen.items():
        assert ratios == progressive[-zero_at:] + progressive[:-zero_at] if zero_at else ratios == progressive
    assert jf.NoiseSchedule(window=4).row_phase(random.Random(0)) == 0  # progressive: no rotation


def test_one_block_windows_with_a_random_grid_give_clean_earlier_blocks_and_every_ratio():
    """forcing_window 1 + forcing_levels 4 (random): what a one-block decoder sees, every block meeting every ratio."""
    n = 4
    records = response("a", [1, 5], n, 4, torch.Generator().manual_seed(0))
    schedule = jf.NoiseSchedule(window=1, schedule="random", levels=4)
    seen = {j: set() for j in range(4)}
    for seed in range(60):
        row = jf.build_row(records, schedule, random.Random(seed), n=n, max_length=100, eos_token_id=None)
        for j, pair in enumerate(row.pairs):
            seen[j].add(jf.noise_ratio(pair.noisy, pair.fixed))
    assert all(ratios == {0.0, 0.25, 0.75, 1.0} for ratios in seen.values())  # the grid 0, 1/3, 2/3, 1 per block
    c = len(row.context)
    layout = jf.row_layout(row, n)
    kinds, pairs, windows = (torch.tensor([values]) for values in layout[2:])
    mask = jf.may_attend(kinds, pairs, windows)[0]
    for p in range(1, 4):  # noisy_p sees fixed_i (i < p), never noisy_i
        q = c + 2 * p * n
        assert all(mask[q, c + (2 * i + 1) * n] for i in range(p))
        assert not any(mask[q, c + 2 * i * n] for i in range(p))
    assert jf.NoiseSchedule(window=4, schedule="random").target_ratio(0, random.Random(0)) in (0.0, 1 / 3, 2 / 3, 1.0)
    with pytest.raises(UserError, match="forcing_levels=4 needs forcing_schedule=random"):
        jf.NoiseSchedule(window=1, schedule="progressive", levels=4)


def test_synthesised_state_sits_at_the_target_ratio_when_the_trajectory_has_none():
    fixed = [10, 11, 12, 13, 14, 15, 16, 17]
    fast = Record("a", 0, [1, 5, 6, 7], [], [[10, 11, 12, 13, 14, 15, 99, 98], fixed])  # converged in one step
    rng = random.Random(0)
    assert jf.pick_noisy_state(fast, 1.0, rng) == fast.states[0]  # nearest: ratio 2/8
    made = jf.pick_noisy_state(fast, 1.0, rng, synthesise=True)
    assert jf.noise_ratio(made, fixed) == 1.0 and set(made) <= {1, 5, 6, 7}
    made = jf.pick_noisy_state(fast, 0.5, rng, synthesise=True)
    assert jf.first_difference(made, fixed) == 4 and made[:4] == fixed[:4]
    assert jf.pick_noisy_state(fast, 0.25, rng, synthesise=True) == fast.states[0]  # within 1/n: no synthesis


def tiny_module() -> CLLMModule:
    module = CLLMModule(model="tiny", dtype="float64", n=4, attn_implementation="sdpa")
    module.configure_model()
    return module


def alone(module: CLLMModule, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return module.model(input_ids=torch.tensor([tokens])).logits[0]


@pytest.mark.parametrize(("window", "max_length", "eos_at"), [(2, 200, None), (3, 200, 1), (2, 30, 2)])
def test_each_pair_in_the_row_has_the_losses_of_the_pair_alone_with_its_explicit_context(window, max_length, eos_at):
    n = 4
    generator = torch.Generator().manual_seed(window)
    records = response("a", [1, 5, 6, 7, 8], n, 5, generator, eos_at) + response("b", [1, 9], n, 2, generator)
    schedule = jf.NoiseSchedule(window=window, schedule="random")
    rows = rows_of(records[:5], schedule, n, max_length) + rows_of(records[5:], schedule, n, max_length)
    batch = jf.collate_forcing([{"row": row} for row in rows], pad_id=0, n=n)
    module = tiny_module()
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    assert torch.isfinite(logits).all()
    per_offset, keep = forcing_losses.pair_divergences(
        logits, batch["input_ids"], batch["pair_starts"], batch["pair_scored"], n, "forward_kl"
    )
    expected_terms, expected_keep, real, ar_sum, ar_count = [], [], [], 0.0, 0
    for row in rows:
        fixed_path = list(row.context)
        for j, pair in enumerate(row.pairs):
            # explicit contexts: fixed_j after every earlier fixed block; noisy_j after the fixed blocks of earlier
            # windows and the noisy blocks of its own window
            noisy_context = list(row.context)
            for earlier in row.pairs[:j]:
                noisy_context += earlier.noisy if earlier.window == pair.window else earlier.fixed
            student = alone(module, noisy_context + pair.noisy)[-n:]
            target = alone(module, fixed_path + pair.fixed)[-n:]
            expected_terms.append(divergence(target, student, "forward_kl"))
            first = jf.first_difference(pair.noisy, pair.fixed)
            expected_keep.append([first <= t < pair.scored for t in range(n)])
            real.append([t < pair.length for t in range(n)])  # after an EOS: padding, seen by no one
            fixed_path += pair.fixed
        # AR: the clean path context + fixed blocks, nothing after EOS, the context only in a row's first window
        path_logits = alone(module, fixed_path)
        c, end = len(row.context), len(row.context) + sum(pair.length for pair in row.pairs)
        targets = list(range(1 if not row.continues else c, end))
        ar_sum += sum(-torch.log_softmax(path_logits[t - 1], -1)[fixed_path[t]] for t in targets)
        ar_count += len(targets)
    assert keep.tolist() == expected_keep
    real = torch.tensor(real)
    torch.testing.assert_close(per_offset[real], torch.stack(expected_terms)[real], rtol=0, atol=1e-10)
    parts = forcing_losses.forcing_losses(logits, batch, n, kind="forward_kl", consistency_weight=1, ar_weight=10)
    kept = torch.tensor(expected_keep, dtype=torch.float64)
    torch.testing.assert_close(parts["consistency_loss"], (torch.stack(expected_terms) * kept).sum() / kept.sum())
    torch.testing.assert_close(parts["ar_loss"], ar_sum / ar_count, rtol=0, atol=1e-10)
    torch.testing.assert_close(parts["loss"], parts["consistency_loss"] + 10 * parts["ar_loss"])


def test_a_state_equal_to_its_fixed_point_adds_no_consistency_term():
    n = 4
    records = response("a", [1, 5, 6], n, 3, torch.Generator().manual_seed(3))
    row = rows_of(records, jf.NoiseSchedule(window=3), n, 200)[0]
    clean = jf.ForcingRow(
        row.context, row.prompt_length, False, [jf.ForcingPair(p.fixed, p.fixed, n, 0) for p in row.pairs]
    )
    module = tiny_module()
    batch = jf.collate_forcing([{"row": clean}], pad_id=0, n=n)
    logits = module(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    _, keep = forcing_losses.pair_divergences(logits, batch["input_ids"], batch["pair_starts"], batch["pair_scored"], n)
    assert not keep.any()
    parts = forcing_losses.forcing_losses(logits, batch, n)
    assert parts["consistency_loss"] == 0 and parts["ar_loss"] > 0
    # and a clean pair next to noisy ones leaves their mean unchanged
    mixed = jf.ForcingRow(row.context, row.prompt_length, False, [clean.pairs[0], *row.pairs[1:]])
    one = forcing_losses.forcing_losses(*_forward(module, mixed, n), n)["consistency_loss"]
    for pair in mixed.pairs[1:]:  # the clean pair in an earlier window: seen as fixed_0, the same tokens
        pair.window = 1
    torch.testing.assert_close(forcing_losses.forcing_losses(*_forward(module, mixed, n), n)["consistency_loss"], one)


def _forward(module, row, n):
    batch = jf.collate_forcing([{"row": row}], pad_id=0, n=n)
    with torch.no_grad():
        return module(batch["input_ids"], batch["attention_mask"], batch["position_ids"]), batch


def test_ar_labels_follow_the_clean_path():
    row = jf.ForcingRow(
        [1, 5, 6], 2, False, [jf.ForcingPair([7, 8], [10, 11], 2, 0), jf.ForcingPair([9, 9], [12, 2], 2, 0, ends=True)]
    )
    labels = jf.ar_labels(row, 2)
    # tokens:  1  5  6 | 7  8  10 11 | 9  9  12 2
    # logit t scored against labels[t + 1]: 1->5, 5->6, 6->10 (bridge), 10->11, 11->12 (bridge), 12->EOS
    assert labels == [-100, 5, 6, 10, -100, -100, 11, 12, -100, -100, 2]

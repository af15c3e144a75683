"""Golden values for the CLLM losses, computed by hand with `math` on tiny distributions (float64)."""

import math

import pytest
import torch

from cllm.losses import (
    ar_loss,
    block_logits,
    consistency_loss,
    divergence,
    positions_after_first_mismatch,
    total_loss,
)

P_TARGET = [0.7, 0.2, 0.1]
P_STUDENT = [0.2, 0.5, 0.3]


def logits_of(probs):
    return torch.tensor([math.log(p) for p in probs], dtype=torch.float64)


def by_hand(kind, target, student):
    if kind == "forward_kl":
        return sum(t * (math.log(t) - math.log(s)) for t, s in zip(target, student))
    if kind == "soft_ce":
        return -sum(t * math.log(s) for t, s in zip(target, student))
    return sum(s * (math.log(s) - math.log(t)) for t, s in zip(target, student))


@pytest.mark.parametrize("kind", ["forward_kl", "soft_ce", "reverse_kl"])
def test_divergence_golden(kind):
    value = divergence(logits_of(P_TARGET), logits_of(P_STUDENT), kind)
    assert value.item() == pytest.approx(by_hand(kind, P_TARGET, P_STUDENT), abs=1e-6)


def test_divergences_differ_and_vanish_on_equal_inputs():
    values = {k: by_hand(k, P_TARGET, P_STUDENT) for k in ("forward_kl", "soft_ce", "reverse_kl")}
    assert len({round(v, 6) for v in values.values()}) == 3  # the golden inputs tell the three apart
    same = logits_of(P_TARGET)
    assert divergence(same, same, "forward_kl").item() == pytest.approx(0, abs=1e-7)
    assert divergence(same, same, "reverse_kl").item() == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(same, same, "js")


def test_block_logits_takes_the_previous_position():
    logits = torch.arange(2 * 6, dtype=torch.float64).reshape(2, 6, 1).expand(2, 6, 3)
    picked = block_logits(logits, torch.tensor([2, 3]), n=3)
    # row 0: positions 1,2,3 ; row 1: positions 2,3,4 (values = 6*row + position)
    assert picked[..., 0].tolist() == [[1, 2, 3], [8, 9, 10]]


def test_positions_after_first_mismatch():
    state = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 9, 7, 9]])
    target = torch.tensor([[5, 6, 7, 8], [5, 6, 1, 8], [5, 6, 7, 8]])
    keep = positions_after_first_mismatch(state, target)
    assert keep.tolist() == [
        [False, False, False, False],  # identical: every prediction sees the target's prefix
        [False, False, False, True],  # mismatch at 2: only position 3 sees a different prefix
        [False, False, True, True],  # mismatch at 1
    ]


def _consistency_case():
    """One row, context of 2 tokens, n=3 block at positions 2..4; distinct distributions per position."""
    vocab = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5], [0.6, 0.3, 0.1]]
    student_p = [[0.2, 0.5, 0.3], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    target_logits = torch.stack([logits_of(p) for p in vocab])[None]
    student_logits = torch.stack([logits_of(p) for p in student_p])[None]
    # block predictions come from positions 1, 2, 3
    per_position = [by_hand("forward_kl", vocab[t], student_p[t]) for t in (1, 2, 3)]
    return target_logits, student_logits, per_position


def test_global_consistency_mean_over_block_positions():
    target, student, per_position = _consistency_case()
    loss = consistency_loss(student, target, torch.tensor([2]), 3, kind="forward_kl")
    assert loss.item() == pytest.approx(sum(per_position) / 3, abs=1e-6)


def test_consistency_masking_before_first_mismatch():
    target, student, per_position = _consistency_case()
    state_ids = torch.tensor([[9, 9, 4, 1, 2]])
    fixed_point_ids = torch.tensor([[9, 9, 4, 7, 2]])  # block mismatch at block index 1 -> keep index 2 only
    loss = consistency_loss(
        student,
        target,
        torch.tensor([2]),
        3,
        state_ids=state_ids,
        target_ids=fixed_point_ids,
        mask_before_mismatch=True,
    )
    assert loss.item() == pytest.approx(per_position[2], abs=1e-6)
    # nothing differs -> 0, not NaN
    none = consistency_loss(
        student, target, torch.tensor([2]), 3, state_ids=state_ids, target_ids=state_ids, mask_before_mismatch=True
    )
    assert none.item() == 0.0


def test_consistency_target_is_detached():
    target, student, _ = _consistency_case()
    target.requires_grad_(True)
    student.requires_grad_(True)
    consistency_loss(student, target, torch.tensor([2]), 3).backward()
    assert target.grad is None and student.grad is not None and student.grad.abs().sum() > 0


def _ar_case():
    probs = [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4], [0.25, 0.25, 0.5]]
    logits = torch.stack([logits_of(p) for p in probs])[None]
    ids = torch.tensor([[0, 1, 2, 0]])
    return probs, logits, ids


def test_ar_loss_golden_with_and_without_prompt_mask():
    probs, logits, ids = _ar_case()
    mask = torch.tensor([[1, 1, 1, 0]])  # last token is padding: not a target
    # targets: ids[1] from probs[0], ids[2] from probs[1]
    expected_all = -(math.log(probs[0][1]) + math.log(probs[1][2])) / 2
    assert ar_loss(logits, ids, mask).item() == pytest.approx(expected_all, abs=1e-6)
    expected_masked = -math.log(probs[1][2])  # prompt_length 2: token 1 is prompt, only token 2 is scored
    got = ar_loss(logits, ids, mask, prompt_length=torch.tensor([2]))
    assert got.item() == pytest.approx(expected_masked, abs=1e-6)


def test_ar_loss_label_smoothing_golden():
    probs, logits, ids = _ar_case()
    mask = torch.ones_like(ids)
    eps = 0.1
    terms = []
    for t in range(3):
        target = ids[0, t + 1].item()
        nll = -math.log(probs[t][target])
        uniform = -sum(math.log(p) for p in probs[t]) / 3
        terms.append((1 - eps) * nll + eps * uniform)
    got = ar_loss(logits, ids, mask, label_smoothing=eps)
    assert got.item() == pytest.approx(sum(terms) / 3, abs=1e-6)


def test_total_loss_weights():
    c, a = torch.tensor(0.5), torch.tensor(2.0)
    assert total_loss(c, a).item() == pytest.approx(0.5 + 10 * 2.0)
    assert total_loss(c, a, consistency_weight=2.0, ar_weight=0.0).item() == pytest.approx(1.0)

"""Sliced logits (the LM head only where the losses read) give the same losses and gradients as full logits.

float64, tiny model, every loss variant, unpacked and packed rows (with padding rows and padded states).
"""

from __future__ import annotations

import pytest
import torch
from test_packing import BLOCK, MAX_LENGTH, jacobi_record, pack, tiny_module

from cllm import logit_table, losses
from cllm.data_modules.trajectory_data import collate
from cllm.logit_table import LogitTable, head_only_at, needed_positions


def records(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [jacobi_record(generator, 9, states=3), jacobi_record(generator, 6, states=2)]  # rows of unequal length


def unpacked_batch(seed: int = 0) -> dict:
    samples = []
    for record in records(seed):
        labels = [7 + (i % 50) for i in range(BLOCK + 3)]
        record = record.__class__(**{**record.__dict__, "labels": labels})
        for j, state in enumerate(record.states[:-1]):
            samples.append({"record": record, "state": state, "next_state": record.states[j + 1]})
    return collate(samples, pad_id=0, n=BLOCK, max_length=MAX_LENGTH, next_state=True, use_labels=True)


def losses_and_grads(options: dict, batch: dict, sliced: bool) -> tuple[dict, list[torch.Tensor]]:
    module = tiny_module(sliced_logits=sliced, **options)
    parts = module.compute_losses(batch)
    parts["loss"].backward()
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.model.parameters()]
    return {k: v.detach() for k, v in parts.items()}, grads


def assert_same(options: dict, batch: dict) -> None:
    full, full_grads = losses_and_grads(options, batch, sliced=False)
    sliced, sliced_grads = losses_and_grads(options, batch, sliced=True)
    for name in full:
        torch.testing.assert_close(sliced[name], full[name], rtol=1e-12, atol=1e-12)
    for a, b in zip(sliced_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert full["loss"] > 0


UNPACKED = [
    {},
    {"divergence": "soft_ce", "ar_mask_prompt": True},
    {"divergence": "reverse_kl", "mask_before_mismatch": True, "label_smoothing": 0.1},
    {"consistency": "local"},
    {"consistency": "local", "ar_target": "labels", "ar_mask_prompt": True},
    {"ar_target": "labels"},
    {"ar_weight": 0.0},
    {"consistency_weight": 0.0},
    {"consistency_weight": 0.0, "ar_target": "labels"},
]


@pytest.mark.parametrize("options", UNPACKED)
def test_unpacked_sliced_equals_full(options):
    assert_same(options, unpacked_batch())


PACKED = [
    {},
    {"divergence": "reverse_kl", "mask_before_mismatch": True, "ar_mask_prompt": True},
    {"divergence": "soft_ce", "label_smoothing": 0.1},
    {"ar_weight": 0.0},
    {"consistency_weight": 0.0},
]


@pytest.mark.parametrize("options", PACKED)
def test_packed_sliced_equals_full(options):
    assert_same(options, pack(records()))


def test_the_head_runs_only_at_the_needed_positions():
    module = tiny_module()
    ids = torch.randint(3, 200, (3, 7))
    needed = needed_positions((3, 7), (torch.tensor([[0], [2]]), torch.tensor([[1, 2], [5, 6]])))
    assert needed.sum() == 4
    with torch.no_grad():
        with head_only_at(module.model, needed) as table:
            selected = table(module.model(input_ids=ids).logits)
        full = module.model(input_ids=ids).logits
    assert selected.logits.shape == (4, full.shape[-1])  # the head ran on 4 positions, not 21
    torch.testing.assert_close(selected.take(torch.tensor([2]), torch.tensor([5])), full[2, 5][None])
    with pytest.raises(IndexError, match="not marked needed"):
        selected.take(torch.tensor([1]), torch.tensor([0]))


def test_chunked_losses_equal_one_chunk(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 11, dtype=torch.float64, generator=generator, requires_grad=True)
    target = torch.randn(2, 9, 11, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 11, (2, 9), generator=generator)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        value = (
            losses.labels_nll(logits, labels, label_smoothing=0.1)
            + losses.divergence(target, logits, "forward_kl").mean()
        )
        (grad,) = torch.autograd.grad(value, logits)
        return value, grad

    whole = both()
    monkeypatch.setattr(losses, "CHUNK", 3)
    monkeypatch.setattr(losses.over_chunks, "__defaults__", (3,))
    chunked = both()
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-12, atol=1e-12)


def test_table_rows_slice_like_logits():
    table = LogitTable(torch.arange(6.0).reshape(3, 2), torch.tensor([[0, -1], [1, 2]]))
    assert table[1:].take(torch.tensor([0]), torch.tensor([1])).tolist() == [[4.0, 5.0]]


def reference_fused(weight, hidden, targets, label_smoothing):
    """What Liger's fused linear cross-entropy computes, the plain way (Liger itself needs CUDA and Triton)."""
    return torch.nn.functional.cross_entropy(hidden @ weight.T, targets, label_smoothing=label_smoothing)


FUSED = [
    ("unpacked", {}),
    ("unpacked", {"label_smoothing": 0.1, "ar_mask_prompt": True}),
    ("unpacked", {"ar_target": "labels"}),
    ("unpacked", {"consistency_weight": 0.0}),
    ("packed", {}),
    ("packed", {"consistency_weight": 0.0}),
]


@pytest.mark.parametrize(("layout", "options"), FUSED)
def test_fused_ar_term_equals_the_sliced_one(monkeypatch, layout, options):
    batch = unpacked_batch() if layout == "unpacked" else pack(records())
    plain, plain_grads = losses_and_grads(options, batch, sliced=True)
    calls = []
    monkeypatch.setattr(logit_table, "fused_ce_available", lambda device: True)
    monkeypatch.setattr(logit_table, "fused_linear_cross_entropy", lambda *a: calls.append(1) or reference_fused(*a))
    fused, fused_grads = losses_and_grads(options, batch, sliced=True)
    assert calls  # the AR term went through the fused path
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], rtol=1e-12, atol=1e-12)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)

"""Packed rows ctx + y* + s_1 + ... + s_k: the same logits, losses and gradients as one unpacked row per state."""

from __future__ import annotations

import random

import pytest
import torch
from test_data_module import N, make_dataset

from cllm import losses
from cllm.callbacks.throughput import ThroughputCallback
from cllm.data_modules.collate import collate, collate_packed
from cllm.data_modules.trajectory_data import TrajectoryDataModule
from cllm.data_modules.trajectory_stream import pick_states
from cllm.errors import UserError
from cllm.module import CLLMModule, real_tokens
from cllm.records import Record

BLOCK = 4  # n of the tiny module
MAX_LENGTH = 64


def jacobi_record(generator: torch.Generator, context_length: int, states: int) -> Record:
    """A record whose state j has its first j tokens final (as along a Jacobi trajectory), then the fixed point."""
    tokens = torch.randint(3, 259, (context_length + BLOCK * (states + 1),), generator=generator).tolist()
    prompt, fixed_point = tokens[: context_length - 2], tokens[context_length : context_length + BLOCK]
    noise = [tokens[context_length + BLOCK * (1 + j) :][:BLOCK] for j in range(states)]
    trajectory = [fixed_point[: j % BLOCK] + noise[j][j % BLOCK :] for j in range(states)]
    return Record("p", 1, prompt, tokens[context_length - 2 : context_length], trajectory + [fixed_point])


def tiny_module(**kwargs) -> CLLMModule:
    module = CLLMModule(model="tiny", dtype="float64", n=BLOCK, **kwargs)
    module.configure_model()
    return module


def packed_samples(records: list[Record]) -> list[dict]:
    return [{"record": record, "states": record.states[:-1]} for record in records]


def unpacked_samples(records: list[Record]) -> list[dict]:
    return [{"record": record, "state": state} for record in records for state in record.states[:-1]]


def pack(records: list[Record]) -> dict:
    return collate_packed(packed_samples(records), pad_id=0, n=BLOCK, max_length=MAX_LENGTH)


def unpack(records: list[Record]) -> dict:
    samples = unpacked_samples(records)
    return collate(samples, pad_id=0, n=BLOCK, max_length=MAX_LENGTH, next_state=False, use_labels=False)


# eager attention takes its softmax in float32 whatever the model's dtype: only float32-close there
@pytest.mark.parametrize(("attention", "atol"), [("sdpa", 1e-10), ("eager", 1e-6)])
def test_each_packed_segment_has_the_logits_of_its_own_unpacked_pass(attention, atol):
    generator = torch.Generator().manual_seed(0)
    records = [jacobi_record(generator, 9, states=3), jacobi_record(generator, 6, states=1)]  # padded row and state
    module = tiny_module(attn_implementation=attention)
    batch = pack(records)
    with torch.no_grad():
        logits = module(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
        for row, record in enumerate(records):
            context = len(record.context)
            alone = module.model(input_ids=torch.tensor([record.context + record.fixed_point])).logits[0]
            torch.testing.assert_close(logits[row, : context + BLOCK], alone, rtol=0, atol=atol)
            for j, state in enumerate(record.states[:-1]):
                alone = module.model(input_ids=torch.tensor([record.context + state])).logits[0]
                start = batch["segment_starts"][row, j]
                torch.testing.assert_close(logits[row, start : start + BLOCK], alone[context:], rtol=0, atol=atol)
    assert torch.isfinite(logits).all()  # padding rows attend to something: no NaN to leak into gradients


@pytest.mark.parametrize(
    "options",
    [{"divergence": "forward_kl"}, {"divergence": "reverse_kl", "mask_before_mismatch": True, "ar_mask_prompt": True}],
)
def test_packed_losses_and_gradients_equal_the_unpacked_mean(options):
    # Every record with the same number of states: unpacked, each AR row appears equally often, so the token mean
    # of the AR loss weighs the records as the packed rows do.
    generator = torch.Generator().manual_seed(1)
    records = [jacobi_record(generator, length, states=3) for length in (10, 7, 12)]
    module = tiny_module(**options)
    calls = []
    module.model.register_forward_pre_hook(lambda *_: calls.append(1))
    packed = module.compute_losses(pack(records))
    assert len(calls) == 1  # AR and every state's consistency from ONE forward pass
    packed_grads = torch.autograd.grad(packed["loss"], list(module.parameters()))
    unpacked = module.compute_losses(unpack(records))
    unpacked_grads = torch.autograd.grad(unpacked["loss"], list(module.parameters()))
    for part in ("loss", "consistency_loss", "ar_loss"):
        torch.testing.assert_close(packed[part], unpacked[part], rtol=0, atol=1e-10)
    assert packed["consistency_loss"] > 0
    # HF's LlamaRMSNorm normalizes in float32 even in a float64 model, so the backward pass rounds gradients to
    # float32 on its way through each norm: equal up to float32 rounding of each tensor's scale (a wrong mask is
    # off by far more).
    for ours, theirs in zip(packed_grads, unpacked_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * theirs.abs().max().item())


def test_collate_packed_layout():
    full = Record("a", 0, [1, 10], [11], [[30, 31], [30, 32], [30, 33], [40, 41]])
    short = Record("b", 0, [1, 12], [], [[50, 51], [52, 53]])  # one non-final state for k = 3: packed alone
    samples = [{"record": full, "states": full.states[:-1]}, {"record": short, "states": short.states[:-1]}]
    batch = collate_packed(samples, pad_id=0, n=2, max_length=4)  # context budget 2: `full` loses its first token
    assert batch["input_ids"].tolist() == [
        [10, 11, 40, 41, 30, 31, 30, 32, 30, 33],
        [1, 12, 52, 53, 50, 51, 0, 0, 0, 0],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 2, 3, 2, 3], [0, 1, 2, 3, 2, 3, 0, 0, 0, 0]]
    assert batch["segment_starts"].tolist() == [[4, 6, 8], [4, -1, -1]]
    assert batch["block_start"].tolist() == [2, 2] and batch["prompt_length"].tolist() == [1, 2]
    assert batch["fixed_point_mask"].tolist() == [[1] * 4 + [0] * 6, [1] * 4 + [0] * 6]
    assert real_tokens(batch, n=2) == 10 + 6
    may_attend = batch["attention_mask"]
    assert may_attend.shape == (2, 1, 10, 10) and may_attend.dtype == torch.bool
    # row 0, state 1 (positions 6, 7): the context and itself, causally; never y* (2, 3) or state 0 (4, 5)
    assert may_attend[0, 0, 7].nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert may_attend[0, 0, 6].nonzero().flatten().tolist() == [0, 1, 6]
    assert may_attend[0, 0, 3].nonzero().flatten().tolist() == [0, 1, 2, 3]  # y*: the unpacked causal row
    assert not may_attend[1, 0, :6, 6:].any()  # no real token sees padding


def test_packed_segments_pick_the_logits_that_predict_each_state():
    block_start, segment_starts = torch.tensor([2, 3]), torch.tensor([[5, 8], [6, -1]])
    rows, token_positions, logit_positions = losses.packed_segments(block_start, segment_starts, n=3)
    assert rows.tolist() == [0, 0, 1]
    assert token_positions.tolist() == [[5, 6, 7], [8, 9, 10], [6, 7, 8]]
    assert logit_positions.tolist() == [[1, 5, 6], [1, 8, 9], [2, 6, 7]]  # token 0 from the last context logit


def test_pack_draws_k_distinct_states_deterministically():
    record = Record("a", 0, [1], [], [[5, 5], [6, 5], [6, 7], [8, 8], [9, 9]], augmented_states=[[5, 7]])
    picks = [pick_states(record, "pack", False, random.Random(i), pack_states=3) for i in range(50)]
    assert all(len({tuple(state) for state, _ in pick}) == 3 for pick in picks)
    assert pick_states(record, "pack", False, random.Random(7), pack_states=3) == picks[7]
    assert sorted(s for s, _ in pick_states(record, "pack", False, random.Random(0), pack_states=9)) == sorted(
        record.states[:-1] + record.augmented_states
    )


def test_packed_data_module_gives_one_row_per_record(tmp_path):
    records = make_dataset(tmp_path)  # record k has 1 + k % 3 non-final states
    dm = TrajectoryDataModule(
        str(tmp_path), "tiny", n=N, batch_size=2, state_strategy="pack", pack_states=2, val_fraction=0.0
    )
    dm.setup()
    dm.hparams.even_batches = False
    batches = list(dm.train_dataloader())
    assert sum(batch["input_ids"].shape[0] for batch in batches) == len(records)
    states_per_row = sorted(n for batch in batches for n in (batch["segment_starts"] >= 0).sum(1).tolist())
    assert states_per_row == sorted(min(1 + k % 3, 2) for k in range(len(records)))


def test_pack_refuses_local_consistency_and_labels():
    for option in ({"next_state": True}, {"use_labels": True}):
        with pytest.raises(UserError, match="state_strategy=pack supports global consistency"):
            TrajectoryDataModule("data", "tiny", n=N, state_strategy="pack", **option)
    generator = torch.Generator().manual_seed(2)
    batch = pack([jacobi_record(generator, 5, states=2)])
    with pytest.raises(UserError, match="model.consistency=global only"):
        tiny_module(consistency="local").compute_losses(batch)


def test_fit_on_packed_batches(tmp_path):
    from lightning.pytorch import Trainer

    make_dataset(tmp_path)
    dm = TrajectoryDataModule(str(tmp_path), "tiny", n=N, batch_size=4, state_strategy="pack", val_fraction=0.0)
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    options["callbacks"] = [ThroughputCallback()]  # tokens/s counts the packed rows' real tokens
    trainer = Trainer(max_steps=3, accelerator="cpu", limit_val_batches=0, default_root_dir=tmp_path, **options)
    trainer.fit(CLLMModule(model="tiny", lr=1e-3), datamodule=dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and trainer.callback_metrics["train/tokens_per_s"] > 0

"""CLLMModule on the tiny model: the batched pass equals separate passes, pass counts, NaN stop, tokenizer check."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from fake_trajectories import FakeTrajectoryData
from torch.utils.data import default_collate
from trainers import quiet_trainer

from cllm import losses
from cllm.errors import UserError
from cllm.models import build_tiny_tokenizer
from cllm.module import CLLMModule, warmup_cosine


def built_module(**kwargs) -> tuple[CLLMModule, dict]:
    module = CLLMModule(model="tiny", dtype="float64", n=4, **kwargs)
    module.configure_model()
    data = FakeTrajectoryData(rows=3)
    return module, default_collate(data.records)


def count_calls(model: torch.nn.Module) -> list[int]:
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_batched_student_and_ar_pass_equals_separate_passes():
    module, batch = built_module()
    calls = count_calls(module.model)
    parts = module.compute_losses(batch)
    assert len(calls) == 1  # global consistency + AR on the fixed point: ONE forward pass (2B rows)

    mask = batch["attention_mask"]
    student = module.model(input_ids=batch["input_ids"], attention_mask=mask).logits
    with torch.no_grad():
        target = module.model(input_ids=batch["fixed_point_ids"], attention_mask=mask).logits
    ar_logits = module.model(input_ids=batch["fixed_point_ids"], attention_mask=mask).logits
    consistency = losses.consistency_loss(student, target, batch["block_start"], 4)
    ar = losses.ar_loss(ar_logits, batch["fixed_point_ids"], mask)
    torch.testing.assert_close(parts["consistency_loss"], consistency, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["ar_loss"], ar, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["loss"], consistency + 10 * ar, rtol=1e-10, atol=1e-12)
    assert parts["consistency_loss"] > 0


def test_gradient_flows_into_the_student_only_through_the_student_rows():
    module, batch = built_module(ar_weight=0.0)  # consistency only: the target rows must carry no gradient
    loss = module.compute_losses(batch)["loss"]
    (grad,) = torch.autograd.grad(loss, [module.model.model.embed_tokens.weight])
    # tokens that occur only in the fixed point (target) never receive gradient via embeddings
    only_target = set(batch["fixed_point_ids"][:, 6:].flatten().tolist()) - set(batch["input_ids"].flatten().tolist())
    for token in only_target:
        assert grad[token].abs().sum() == 0


def test_local_consistency_adds_one_no_grad_pass():
    module, batch = built_module(consistency="local")
    calls = count_calls(module.model)
    parts = module.compute_losses(batch)
    assert len(calls) == 2
    mask = batch["attention_mask"]
    student = module.model(input_ids=batch["input_ids"], attention_mask=mask).logits
    target = module.model(input_ids=batch["next_state_ids"], attention_mask=mask).logits
    expected = losses.consistency_loss(student, target, batch["block_start"], 4)
    torch.testing.assert_close(parts["consistency_loss"], expected, rtol=1e-10, atol=1e-12)


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="model.divergence"):
        CLLMModule(model="tiny", divergence="js")
    with pytest.raises(UserError, match="nothing to train"):
        CLLMModule(model="tiny", ar_weight=0, consistency_weight=0)


def test_warmup_cosine_schedule():
    assert [round(warmup_cosine(s, 10, 0.2), 4) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    assert warmup_cosine(10, 10, 0.0, min_ratio=0.1) == pytest.approx(0.1)


class PoisonWeights(L.Callback):
    """Turns one weight into NaN before the given batch, as an exploding update would."""

    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at_batch:
            with torch.no_grad():
                pl_module.model.lm_head.weight[0, 0] = float("nan")


def test_nan_loss_stops_the_run_naming_step_and_batch():
    module = CLLMModule(model="tiny", lr=1e-3)
    run = quiet_trainer(max_steps=4, callbacks=[PoisonWeights(at_batch=2)])
    with pytest.raises(UserError, match=r"not finite \(value nan\) at global step 2, batch index 2"):
        run.fit(module, FakeTrajectoryData())
    assert run.global_step == 2


class CountSteps(L.Callback):
    steps = 0

    def on_train_batch_start(self, *args):
        CountSteps.steps += 1


def test_trajectories_of_another_tokenizer_are_refused_before_training():
    data = FakeTrajectoryData()
    other = build_tiny_tokenizer()
    other.add_tokens(["<extra>"])  # a different vocabulary: ids would mean different text
    data.tokenizer = other
    counter = CountSteps()
    with pytest.raises(UserError, match="tokenized with tokenizer .* but model.model 'tiny' has tokenizer"):
        quiet_trainer(max_steps=2, callbacks=[counter]).fit(CLLMModule(model="tiny"), data)
    assert CountSteps.steps == 0

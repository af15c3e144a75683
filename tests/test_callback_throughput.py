"""ThroughputCallback: FLOP counting against hand-computed numbers; tokens/s, samples/s and MFU in the CSV log."""

from __future__ import annotations

import csv

import pytest
import torch
from fake_trajectories import FakeTrajectoryData
from lightning.pytorch.loggers import CSVLogger
from trainers import quiet_trainer

from cllm.callbacks.throughput import ForwardCounter, ThroughputCallback, matmul_parameters, step_flops
from cllm.models import build_tiny
from cllm.module import CLLMModule


def test_matmul_parameters_drop_the_embedding_lookup_and_count_a_tied_head_once():
    model, _ = build_tiny("tiny")  # untied: 259 x 64 embedding, separate head
    total = sum(p.numel() for p in model.parameters())
    assert matmul_parameters(model) == total - 259 * 64
    model.lm_head.weight = model.model.embed_tokens.weight  # tied: the one matrix is the head
    assert matmul_parameters(model) == total - 259 * 64


def test_step_flops_hand_computed():
    counts = {"grad_tokens": 10, "no_grad_tokens": 4, "grad_squares": 50, "no_grad_squares": 8}
    # 6*100*10 + 2*100*4 + 12*2*8*50 + 4*2*8*8
    assert step_flops(100, layers=2, hidden=8, counts=counts) == 6000 + 800 + 9600 + 512


def test_forward_counter_splits_grad_and_no_grad_and_counts_only_while_armed():
    model, _ = build_tiny("tiny:layers=1")
    counter = ForwardCounter()
    model.register_forward_pre_hook(counter, with_kwargs=True)
    ids = torch.ones(3, 5, dtype=torch.long)
    model(input_ids=ids)  # not armed: validation, decoding
    counter.armed = True
    model(input_ids=ids)
    with torch.no_grad():
        model(ids[:1])
    assert counter.take() == {"grad_tokens": 15, "no_grad_tokens": 5, "grad_squares": 75, "no_grad_squares": 25}
    assert counter.take()["grad_tokens"] == 0


def test_logged_in_the_csv_with_mfu_when_the_peak_is_given(tmp_path):
    data = FakeTrajectoryData(rows=12, batch_size=4)
    module = CLLMModule(model="tiny", lr=1e-3, dtype="float32")
    callback = ThroughputCallback(peak_flops=1e12)
    trainer = quiet_trainer(
        max_steps=3, logger=CSVLogger(tmp_path, name="run", version=0), log_every_n_steps=1, callbacks=[callback]
    )
    trainer.fit(module, datamodule=data)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/tokens_per_s")]
    assert len(rows) == 2  # steps 1 and 2: the first batch is warm-up
    for row in rows:
        tokens_per_s, samples_per_s = float(row["train/tokens_per_s"]), float(row["train/samples_per_s"])
        assert tokens_per_s > 0 and samples_per_s > 0
        # 4 rows of 6 prompt + 4 block tokens: tokens/s = 10 x samples/s
        assert tokens_per_s == pytest.approx(10 * samples_per_s, rel=1e-6)
        assert 0 < float(row["train/mfu"]) < 1


def test_no_mfu_without_a_known_peak(tmp_path):
    module = CLLMModule(model="tiny", lr=1e-3, dtype="float32")
    trainer = quiet_trainer(
        max_steps=2,
        logger=CSVLogger(tmp_path, name="run", version=0),
        log_every_n_steps=1,
        callbacks=[ThroughputCallback()],
    )
    trainer.fit(module, datamodule=FakeTrajectoryData(rows=8, batch_size=4))
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/tokens_per_s" in header and "train/mfu" not in header

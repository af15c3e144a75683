"""AcceptedTokensCallback: its statistics, its decode against jacobi_generate, and what it logs during a fit."""

from __future__ import annotations

import lightning as L
import pytest
from fake_trajectories import FakeTrajectoryData
from lightning.pytorch.loggers import Logger

from cllm.callbacks.accepted_tokens import AcceptedTokensCallback, Decoded, decode_shard
from cllm.jacobi import DecodeOptions, jacobi_generate
from cllm.module import CLLMModule
from cllm.scoring import common_prefix_fraction, has_repeated_run


def test_common_prefix_fraction():
    assert common_prefix_fraction([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert common_prefix_fraction([1, 2, 9, 4], [1, 2, 3, 4]) == 0.5
    assert common_prefix_fraction([1, 2], [1, 2, 3, 4]) == 0.5  # shorter output: the missing part disagrees
    assert common_prefix_fraction([], []) == 1.0


def test_has_repeated_run():
    assert has_repeated_run([5] * 10, 10)
    assert not has_repeated_run([5] * 9 + [6] + [5] * 9, 10)
    assert has_repeated_run([1, 2] + [7] * 10 + [3], 10)


def test_decode_shard_matches_jacobi_generate(tiny_float64):
    model, _ = tiny_float64
    prompts = [[1, 40, 41], [1, 50], [1, 60, 61, 62]]
    kwargs = dict(n=4, max_new_tokens=12, eos_token_id=2, pad_token_id=0)
    decoded = decode_shard(model, prompts, rank=0, world_size=1, batch_size=2, **kwargs)
    direct = jacobi_generate(model, prompts, DecodeOptions(**kwargs))
    assert decoded.indices == [0, 1, 2]
    assert decoded.tokens == direct.tokens
    assert decoded.accepted_tokens_per_step == direct.accepted_tokens_per_step
    # rank 1 of 2 takes every second prompt
    assert decode_shard(model, prompts, rank=1, world_size=2, batch_size=2, **kwargs).indices == [1]


def test_reduce_single_process_values():
    callback = AcceptedTokensCallback(degenerate_run=3)
    callback._base_tokens = {0: [1, 2, 3, 4], 1: [5, 6]}
    decoded = Decoded(indices=[0, 1], tokens=[[1, 2, 9, 9], [7, 7, 7]], accepted_tokens_per_step=[2.0, 1.5], seconds=2)
    values = callback.reduce(decoded, device="cpu")
    assert values["val/accepted_tokens_per_step"] == pytest.approx(1.75)
    assert values["val/base_agreement"] == pytest.approx((0.5 + 0.0) / 2)
    assert values["val/degenerate_rate"] == pytest.approx(0.5)
    assert values["val/jacobi_tokens_per_s"] == pytest.approx(7 / 2)


class RecordingLogger(Logger):
    """Keeps every logged metric and table (stands in for CSV/W&B loggers)."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict]] = []
        self.tables: list[dict] = []

    name = "recording"
    version = 0

    def log_metrics(self, metrics, step=None):
        self.metrics.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns, data):
        self.tables.append({"key": key, "columns": columns, "data": data})


def test_callback_logs_base_at_step_0_then_validations_and_prints_summary(capsys):
    callback = AcceptedTokensCallback(num_prompts=3, max_new_tokens=8, batch_size=3, every_k_validations=2, samples=2)
    logger = RecordingLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        val_check_interval=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=logger,
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CLLMModule(model="tiny", lr=1e-3), FakeTrajectoryData())

    measured = [(step, m) for step, m in logger.metrics if "val/accepted_tokens_per_step" in m]
    base_step, base = measured[0]
    assert base_step == 0 and base["val/base_agreement"] == 1.0 and base["val/accepted_tokens_per_step"] >= 1.0
    # 4 validations, measured every 2nd -> 2 more measurements after the base one
    assert len(measured) == 3 and callback.validations == 4
    for _, values in measured:
        assert set(values) >= {"val/jacobi_tokens_per_s", "val/degenerate_rate", "val/base_agreement"}
    assert logger.tables and logger.tables[-1]["key"] == "val/samples"
    assert len(logger.tables[-1]["data"]) == 2 and len(logger.tables[-1]["columns"]) == 4
    out = capsys.readouterr()
    assert "base" in out.out + out.err and "-> trained" in out.out + out.err


def test_base_reference_survives_a_checkpoint():
    callback = AcceptedTokensCallback()
    callback.base = {"val/accepted_tokens_per_step": 1.07}
    callback._base_tokens = {0: [1, 2], 3: [4]}
    callback.validations = 5
    restored = AcceptedTokensCallback()
    restored.load_state_dict(callback.state_dict())
    assert restored.base == callback.base and restored._base_tokens == {0: [1, 2], 3: [4]}
    assert restored.validations == 5

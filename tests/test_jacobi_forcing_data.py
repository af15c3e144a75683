"""Jacobi Forcing through the data module and the module: one row per prompt window, every prompt once over ranks x
workers, one forward pass per batch, fit on the tiny model."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import torch
from test_jacobi_forcing import response
from trainers import quiet_trainer

from cllm.data_modules import jacobi_forcing as jf
from cllm.data_modules.trajectory_data import TrajectoryDataModule
from cllm.errors import UserError
from cllm.fingerprints import tokenizer_fingerprint
from cllm.models import build_tiny_tokenizer
from cllm.module import CLLMModule, real_tokens
from cllm.records import write_manifest, write_shard

N = 3


def make_responses(folder, prompts_per_shard=(5, 4, 6), n=N) -> list[list]:
    """Prompt k (ids [1, 100 + k]) has 1 + k % 4 blocks; shards hold whole prompts, as collection writes them."""
    generator = torch.Generator().manual_seed(0)
    shards, responses, k = [], [], 0
    for s, count in enumerate(prompts_per_shard):
        records = []
        for _ in range(count):
            responses.append(response(f"p{k}", [1, 100 + k], n, 1 + k % 4, generator))
            records += responses[-1]
            k += 1
        write_shard(folder / f"shard-{s:05d}.jsonl", records)
        shards.append({"file": f"shard-{s:05d}.jsonl", "records": len(records)})
    fingerprint = tokenizer_fingerprint(build_tiny_tokenizer())
    write_manifest(folder, {"model": "tiny", "tokenizer_fingerprint": fingerprint, "n": n, "shards": shards})
    return responses


def forcing_data(folder, **kwargs) -> TrajectoryDataModule:
    options = {"n": N, "batch_size": 2, "val_fraction": 0.0, "state_strategy": "jacobi_forcing", **kwargs}
    dm = TrajectoryDataModule(str(folder), "tiny", **options)
    dm.setup()
    return dm


@pytest.mark.parametrize("even", [False, True])
def test_two_ranks_two_workers_see_every_prompt_window_once(tmp_path, even):
    responses = make_responses(tmp_path)
    max_length = 2 + 2 * N * 2  # two pairs in a first row, one in the rows after: 4 blocks -> 3 rows
    expected = Counter()  # a row is named by its first fixed point
    for records in responses:
        for start, _ in jf.row_spans(records, N, max_length):
            expected[tuple(records[start].fixed_point)] += 1
    assert sorted(Counter(len(jf.row_spans(r, N, max_length)) for r in responses).items()) == [(1, 8), (2, 4), (3, 3)]
    seen, batches = Counter(), []
    for rank in range(2):
        dm = forcing_data(tmp_path, num_workers=2, max_length=max_length)
        dm.hparams.even_batches = even
        loader = dm._loader(validation=False)
        loader.dataset.rank, loader.dataset.world_size = rank, 2
        count = 0
        for batch in loader:
            count += 1
            for row, start in zip(batch["input_ids"].tolist(), batch["pair_starts"][:, 0].tolist()):
                seen[tuple(row[start + N : start + 2 * N])] += 1
        batches.append(count)
    if even:
        assert batches[0] == batches[1] == len(loader)
        assert set(seen) == set(expected)
    else:
        assert seen == expected


def test_one_forward_pass_per_batch_and_a_short_fit(tmp_path):
    make_responses(tmp_path)
    dm = forcing_data(tmp_path, batch_size=4)
    dm.hparams.even_batches = False
    batch = next(iter(dm.train_dataloader()))
    assert batch["attention_mask"].shape[1] == 1 and batch["attention_mask"].dtype == torch.bool
    assert real_tokens(batch, N) == int(batch["row_length"].sum())
    module = CLLMModule(model="tiny", dtype="float64", n=N, attn_implementation="eager")  # additive 4D mask
    module.configure_model()
    calls = []
    module.model.register_forward_pre_hook(lambda *_: calls.append(1))
    parts = module.compute_losses(batch)
    assert len(calls) == 1 and parts["consistency_loss"] > 0 and parts["ar_loss"] > 0

    trainer = quiet_trainer(max_steps=3, default_root_dir=tmp_path)
    trainer.fit(CLLMModule(model="tiny", lr=1e-3), datamodule=forcing_data(tmp_path, batch_size=4))
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert {"train/consistency_loss", "train/ar_loss"} <= set(trainer.callback_metrics)


def test_forcing_refuses_what_it_cannot_train(tmp_path):
    for option in ({"next_state": True}, {"use_labels": True}):
        with pytest.raises(UserError, match="state_strategy=jacobi_forcing supports global consistency"):
            TrajectoryDataModule("data", "tiny", n=N, state_strategy="jacobi_forcing", **option)
    with pytest.raises(UserError, match="forcing_schedule must be one of"):
        TrajectoryDataModule("data", "tiny", n=N, state_strategy="jacobi_forcing", forcing_schedule="cyclic")
    with pytest.raises(UserError, match="must exceed 2n"):
        TrajectoryDataModule("data", "tiny", n=N, state_strategy="jacobi_forcing", max_length=2 * N)
    make_responses(tmp_path)
    batch = next(iter(forcing_data(tmp_path).train_dataloader()))
    module = CLLMModule(model="tiny", n=N, consistency="local")
    module.configure_model()
    with pytest.raises(UserError, match="model.consistency=global only"):
        module.compute_losses(batch)


def test_official_import_data_trains_as_jacobi_forcing_rows(tmp_path):
    from test_trajectory_import import BLOCK0, BLOCK1, PROMPT, official_entries, run_import

    _, out = run_import(tmp_path, official_entries())
    dm = forcing_data(out, batch_size=2)
    dm.hparams.even_batches = False
    batch = next(iter(dm.train_dataloader()))
    rows = batch["input_ids"].tolist()
    # data_0: its two blocks in one row, context = the prompt; data_1: one block
    first = next(row for row in rows if row[: len(PROMPT)] == PROMPT)
    assert first[3 + N : 3 + 2 * N] == BLOCK0[-1] and first[3 + 3 * N : 3 + 4 * N] == BLOCK1[-1]
    assert sorted(batch["pair_starts"].tolist()) == [[2, -1], [3, 3 + 2 * N]]


def test_sliced_logits_give_the_full_logits_losses_and_gradients(tmp_path):
    make_responses(tmp_path)
    batch = next(iter(forcing_data(tmp_path, batch_size=4).train_dataloader()))
    results = []
    for sliced in (True, False):
        module = CLLMModule(model="tiny", dtype="float64", n=N, attn_implementation="sdpa", sliced_logits=sliced)
        module.configure_model()
        parts = module.compute_losses(batch)
        results.append((parts, torch.autograd.grad(parts["loss"], list(module.parameters()))))
    (sliced, sliced_grads), (full, full_grads) = results
    for part in ("loss", "consistency_loss", "ar_loss"):
        torch.testing.assert_close(sliced[part], full[part], rtol=0, atol=1e-10)
    for ours, theirs in zip(sliced_grads, full_grads):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * theirs.abs().max().item())


NO_COMPILER = shutil.which("g++") is None and shutil.which("clang++") is None


@pytest.mark.skipif(NO_COMPILER, reason="inductor needs a C++ compiler")
def test_flex_attention_takes_the_forcing_mask_as_a_block_mask(tmp_path):
    """What `attn_implementation: auto` picks for these batches on CUDA; on CPU FlexAttention runs float32 only."""
    make_responses(tmp_path)
    batch = next(iter(forcing_data(tmp_path, batch_size=4).train_dataloader()))
    parts = {}
    for attention in ("sdpa", "flex_attention"):
        module = CLLMModule(model="tiny", dtype="float32", n=N, attn_implementation=attention)
        module.configure_model()
        with torch.no_grad():
            parts[attention] = module.compute_losses(batch)
    for part in ("loss", "consistency_loss", "ar_loss"):
        torch.testing.assert_close(parts["flex_attention"][part], parts["sdpa"][part], rtol=1e-5, atol=1e-6)


def test_auto_attention_keeps_flash_attn_away_from_4d_masks(tmp_path, monkeypatch):
    from cllm import models

    make_responses(tmp_path)
    assert forcing_data(tmp_path).masked_batches
    assert not TrajectoryDataModule(str(tmp_path), "tiny", n=N).masked_batches
    assert models.resolve_attn_implementation("auto", masked=True) == "sdpa"  # no CUDA here
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object())  # flash-attn "installed"
    assert models.resolve_attn_implementation("auto", masked=True) == "flex_attention"
    assert models.resolve_attn_implementation("auto") == "flash_attention_2"
    assert models.resolve_attn_implementation("eager", masked=True) == "eager"


def test_the_module_reads_masked_batches_from_its_data_module(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from cllm import models

    make_responses(tmp_path)
    module = CLLMModule(model="tiny", dtype="float32", n=N)
    module._trainer = SimpleNamespace(datamodule=forcing_data(tmp_path))
    module.setup("fit")
    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: True)
    assert module._masked_batches and module._attn_implementation() == "flex_attention"

"""TrajectoryDataModule: collation contract, exactly-once streaming over ranks x workers, bad input, collect-on-fit."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from trainers import BatchRecorder, quiet_trainer

from cllm.data_modules.collate import collate
from cllm.data_modules.trajectory_data import TrajectoryDataModule
from cllm.data_modules.trajectory_stream import TrajectoryStream, pick_states
from cllm.errors import UserError
from cllm.fingerprints import tokenizer_fingerprint
from cllm.models import build_tiny_tokenizer
from cllm.records import Record, write_manifest, write_shard

N = 3


def make_dataset(folder, records_per_shard=(7, 5, 9), n=N, fingerprint=None) -> list[Record]:
    """Synthetic dataset: record k has 1 + k % 3 non-final states; prompt ids p0..p20."""
    shards, all_records, k = [], [], 0
    for s, count in enumerate(records_per_shard):
        records = []
        for _ in range(count):
            states = [[k, j, 7][:n] + [0] * (n - 3) for j in range(1 + k % 3)] + [[9] * n]
            records.append(Record(f"p{k}", 0, [1, 5, 6], [], states, labels=[4, 2]))
            k += 1
        write_shard(folder / f"shard-{s:05d}.jsonl", records)
        shards.append({"file": f"shard-{s:05d}.jsonl", "records": count})
        all_records += records
    fingerprint = fingerprint or tokenizer_fingerprint(build_tiny_tokenizer())
    write_manifest(folder, {"model": "tiny", "tokenizer_fingerprint": fingerprint, "n": n, "shards": shards})
    return all_records


def test_collate_pads_right_and_truncates_context_from_the_left():
    record = Record("a", 1, [1, 10, 11], [20, 21, 22], [[30, 31, 32], [30, 33, 34], [30, 33, 35]], labels=[40, 2])
    short = Record("b", 0, [1, 12], [], [[50, 51, 52], [50, 53, 54]], labels=[41])
    samples = [
        {"record": record, "state": record.states[0], "next_state": record.states[1]},
        {"record": short, "state": short.states[0], "next_state": short.states[1]},
    ]
    batch = collate(samples, pad_id=0, n=3, max_length=8, next_state=True, use_labels=True)
    # record: context of 6 tokens, budget max_length - n = 5 -> the first prompt token is cut.
    assert batch["input_ids"].tolist() == [[10, 11, 20, 21, 22, 30, 31, 32], [1, 12, 50, 51, 52, 0, 0, 0]]
    assert batch["fixed_point_ids"].tolist() == [[10, 11, 20, 21, 22, 30, 33, 35], [1, 12, 50, 53, 54, 0, 0, 0]]
    assert batch["next_state_ids"].tolist() == [[10, 11, 20, 21, 22, 30, 33, 34], [1, 12, 50, 53, 54, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 8, [1] * 5 + [0] * 3]
    assert batch["block_start"].tolist() == [5, 2] and batch["prompt_length"].tolist() == [2, 2]
    assert batch["labels_ids"].tolist() == [[1, 10, 11, 40, 2], [1, 12, 41, -100, -100]]
    assert batch["labels_attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_state_strategies():
    record = Record("a", 0, [1], [], [[5, 5], [6, 5], [6, 7]], augmented_states=[[5, 7]])
    import random

    assert len(pick_states(record, "all", False, random.Random(0))) == 3
    assert len(pick_states(record, "all", True, random.Random(0))) == 2  # augmented states have no next state
    picks = Counter(tuple(pick_states(record, "uniform", False, random.Random(i))[0][0]) for i in range(300))
    assert set(picks) == {(5, 5), (6, 5), (5, 7)} and min(picks.values()) > 60
    assert pick_states(Record("b", 0, [1], [], [[3, 3]]), "uniform", False, random.Random(0)) == []


@pytest.mark.parametrize("even", [False, True])
def test_two_ranks_two_workers_see_every_record_once(tmp_path, even):
    records = make_dataset(tmp_path)
    seen = Counter()
    batches = []
    for rank in range(2):
        dm = TrajectoryDataModule(str(tmp_path), "tiny", n=N, batch_size=2, num_workers=2, val_fraction=0.0)
        dm.hparams.even_batches = even
        dm.setup()
        loader = dm._loader(validation=False)
        loader.dataset.rank, loader.dataset.world_size = rank, 2
        count = 0
        for batch in loader:
            count += 1
            for row in batch["input_ids"].tolist():
                seen[row[3]] += 1  # first state token = record number k
        batches.append(count)
    if even:
        assert batches[0] == batches[1] == len(loader)
        assert set(seen) == set(range(len(records))) and sum(seen.values()) >= len(records)
    else:
        assert seen == Counter(range(len(records)))


def test_epochs_reshuffle_and_validation_is_held_out(tmp_path):
    make_dataset(tmp_path)
    dm = TrajectoryDataModule(str(tmp_path), "tiny", n=N, batch_size=4, val_fraction=0.3, shuffle_buffer=8)
    dm.setup()
    loader = dm.train_dataloader()
    orders = [[row[3] for batch in loader for row in batch["input_ids"].tolist()] for _ in range(2)]
    assert orders[0] != orders[1] and set(orders[0]) == set(orders[1])  # repeats (even batches) may differ
    val = [row[3] for batch in dm.val_dataloader() for row in batch["input_ids"].tolist()]
    assert val and not set(val) & set(orders[0])


def test_manifest_with_another_tokenizer_is_refused(tmp_path):
    make_dataset(tmp_path, fingerprint="0123456789abcdef")
    dm = TrajectoryDataModule(str(tmp_path), "tiny", n=N)
    with pytest.raises(UserError) as err:
        dm.setup()
    assert "0123456789abcdef" in str(err.value) and tokenizer_fingerprint(build_tiny_tokenizer()) in str(err.value)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "shard-00000.jsonl:2: malformed JSON"),
        (json.dumps({"prompt_id": "x", "block_index": 0, "prompt_ids": [1], "prefix_ids": []}), "2: field 'states'"),
        (
            json.dumps({"prompt_id": "x", "block_index": 0, "prompt_ids": [1], "prefix_ids": [], "states": [[1, 2]]}),
            "shard-00000.jsonl:2: field 'states[0]' has 2 tokens, expected n = 3",
        ),
    ],
)
def test_bad_lines_are_reported_with_file_line_and_field(tmp_path, line, message):
    make_dataset(tmp_path, records_per_shard=(3,))
    shard = tmp_path / "shard-00000.jsonl"
    lines = shard.read_text().splitlines()
    lines[1] = line
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrajectoryDataModule(str(tmp_path), "tiny", n=N).setup()


def test_fit_from_nothing_collects_then_streams(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"x = {i}"}) + "\n" for i in range(4)))
    folder = tmp_path / "data"
    dm = TrajectoryDataModule(
        str(folder),
        "tiny",
        prompts=str(prompts),
        n=4,
        max_new_tokens=8,
        batch_size=3,
        val_fraction=0.0,
        collect_dtype="float64",
        next_state=True,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.tokenizer is not None and dm.n == 4
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {
        "input_ids",
        "fixed_point_ids",
        "next_state_ids",
        "attention_mask",
        "block_start",
        "prompt_length",
    }
    for row in range(batch["input_ids"].shape[0]):
        start = int(batch["block_start"][row])
        assert torch.equal(batch["input_ids"][row, :start], batch["fixed_point_ids"][row, :start])
        assert batch["attention_mask"][row, : start + 4].all() and not batch["attention_mask"][row, start + 4 :].any()


def test_a_folder_collected_with_another_prompt_limit_is_refused(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"x = {i}"}) + "\n" for i in range(4)))
    asked = {"prompts": str(prompts), "n": 4, "max_new_tokens": 8, "val_fraction": 0.0, "collect_dtype": "float64"}
    first = TrajectoryDataModule(str(tmp_path / "data"), "tiny", prompt_limit=2, **asked)
    first.prepare_data()
    first.setup()
    TrajectoryDataModule(str(tmp_path / "data"), "tiny", **asked).setup()  # no limit asked: any folder trains
    with pytest.raises(UserError, match="collected with prompt_limit = 2, the config asks 4"):
        TrajectoryDataModule(str(tmp_path / "data"), "tiny", prompt_limit=4, **asked).setup()


def test_stream_without_trainer_is_a_plain_iterable(tmp_path):
    records = make_dataset(tmp_path)
    stream = TrajectoryStream(
        tmp_path,
        json.loads((tmp_path / "manifest.json").read_text())["shards"],
        n=N,
        validation=False,
        val_fraction=0.0,
        shuffle=False,
    )
    assert [s["record"].prompt_id for s in stream] == [r.prompt_id for r in records]


def test_a_small_dataset_still_holds_out_one_prompt(tmp_path):
    make_dataset(tmp_path, records_per_shard=(4,))
    dm = TrajectoryDataModule(str(tmp_path), "tiny", n=N, batch_size=2, val_fraction=1e-9)
    dm.setup()
    val = {row[3] for batch in dm.val_dataloader() for row in batch["input_ids"].tolist()}
    train = {row[3] for batch in dm.train_dataloader() for row in batch["input_ids"].tolist()}
    assert len(val) == 1 and train == set(range(4)) - val


def test_trainer_fit_sees_every_record_each_epoch_in_a_new_order(tmp_path):
    make_dataset(tmp_path)
    module = BatchRecorder(column=3)  # first state token = record number k
    dm = TrajectoryDataModule(str(tmp_path), "tiny", n=N, batch_size=4, val_fraction=0.0, even_batches=False)
    quiet_trainer(max_epochs=2, default_root_dir=tmp_path).fit(module, datamodule=dm)
    orders = module.by_epoch
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(21))
    assert orders[0] != orders[1]


@pytest.mark.parametrize("workers, saved_by", [(0, "train step"), (2, "train step"), (0, "validation")])
def test_resume_mid_epoch_trains_on_the_same_batches(tmp_path, workers, saved_by):
    """A run resumed from a mid-epoch checkpoint sees the batches an uninterrupted run sees, across an epoch end,
    whether the checkpoint was written after a training step or (as in the configs) after a validation."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    make_dataset(tmp_path / "data")

    def fit(steps: int, ckpt_path=None) -> tuple[dict[int, list[int]], int]:
        module = BatchRecorder(column=3)
        dm = TrajectoryDataModule(
            str(tmp_path / "data"), "tiny", n=N, batch_size=4, val_fraction=0.3, num_workers=workers
        )
        by_step = saved_by == "train step"
        trainer = quiet_trainer(
            max_steps=steps,
            callbacks=[ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3 if by_step else None, save_top_k=-1)],
            enable_checkpointing=True,
            val_check_interval=None if by_step else 3,
            check_val_every_n_epoch=1 if by_step else None,
            limit_val_batches=0 if by_step else 1,
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        return module.by_step, trainer.num_training_batches

    uninterrupted, per_epoch = fit(10)
    assert 3 < per_epoch < 10  # the checkpoint at step 3 is mid-epoch, and the runs cross an epoch end
    resumed, _ = fit(10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert resumed == {step: uninterrupted[step] for step in range(3, 10)}
    assert uninterrupted[3] != uninterrupted[0]  # replaying the epoch from its start would fail the check above


def test_setup_scan_is_cached_per_manifest_and_settings(tmp_path, monkeypatch):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"y = {i}"}) + "\n" for i in range(3)))
    folder = tmp_path / "data"
    settings = {"prompts": str(prompts), "n": 4, "max_new_tokens": 8, "val_fraction": 0.0}
    first = TrajectoryDataModule(str(folder), "tiny", **settings)
    first.prepare_data()
    first.setup()

    def no_scan(*args):
        raise AssertionError("scanned again")

    monkeypatch.setattr(TrajectoryDataModule, "_scan_lines", no_scan)
    second = TrajectoryDataModule(str(folder), "tiny", **settings)
    second.setup()
    assert second._samples == first._samples and len(list(folder.glob(".scan-*.bin"))) == 1
    with pytest.raises(AssertionError, match="scanned again"):
        TrajectoryDataModule(str(folder), "tiny", **settings, state_strategy="all").setup()


def test_trajectories_of_another_model_with_the_same_tokenizer_train_and_log(tmp_path):
    """Training a model (model.model) on trajectories collected by another one with the same tokenizer (data.model,
    e.g. a CLLM checkpoint trained further on the base model's trajectories) is not refused by Lightning's "same
    hparams key, different values" check; the logged `model` is the trained one."""
    from lightning.pytorch.loggers import CSVLogger

    from cllm.module import CLLMModule

    make_dataset(tmp_path / "data")
    module = CLLMModule(model="tiny:seed=1")
    dm = TrajectoryDataModule(str(tmp_path / "data"), "tiny", n=N, batch_size=4, val_fraction=0.0)
    quiet_trainer(max_steps=1, logger=CSVLogger(tmp_path, name="logs")).fit(module, datamodule=dm)
    logged = (tmp_path / "logs" / "version_0" / "hparams.yaml").read_text()
    assert "model: tiny:seed=1" in logged and "model: tiny\n" not in logged

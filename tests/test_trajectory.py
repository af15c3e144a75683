"""Trajectory collection on a tiny random model (float64): fixed points, greedy equivalence, shards, resume."""

from __future__ import annotations

import json

import pytest
import torch

from cllm.collection import Collector, CollectSettings, main
from cllm.errors import UserError
from cllm.models import load_model
from cllm.records import read_manifest, read_records, write_dataset_manifest
from cllm.trajectory import collect_trajectories

N = 4
MAX_NEW = 13


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = load_model("tiny", dtype="float64")
    return model, tokenizer


def full_block_step(model, context: list[int], state: list[int]) -> list[int]:
    """Reference iteration without a cache: state'[0] = argmax after context, state'[i] = argmax after state[:i]."""
    logits = model(input_ids=torch.tensor([context + state])).logits[0]
    predictions = logits[len(context) - 1 :].argmax(-1).tolist()
    return predictions[: len(state)]


PROMPTS = [[1, 40, 41, 42, 43, 44], [1, 70], [1, 50, 60, 70, 80, 90, 100, 110, 120, 130]]


def test_states_follow_the_iteration_and_end_at_a_fixed_point(tiny):
    model, _ = tiny
    blocks = collect_trajectories(model, PROMPTS, n=N, max_new_tokens=MAX_NEW, eos_token_id=2, seeds=[0, 1, 2])
    for prompt, prompt_blocks in zip(PROMPTS, blocks):
        assert len(prompt_blocks) == -(-MAX_NEW // N)
        for prefix, states in prompt_blocks:
            context = prompt + prefix
            assert all(len(state) == N for state in states)
            for before, after in zip(states, states[1:]):
                assert full_block_step(model, context, before) == after
            assert full_block_step(model, context, states[-1]) == states[-1]  # one more iteration: no change
            assert len(states) <= N + 1


def test_concatenated_fixed_points_equal_greedy_generate(tiny):
    model, _ = tiny
    blocks = collect_trajectories(model, PROMPTS, n=N, max_new_tokens=MAX_NEW, eos_token_id=2, seeds=[5, 6, 7])
    for prompt, prompt_blocks in zip(PROMPTS, blocks):
        jacobi = [token for _, states in prompt_blocks for token in states[-1]][:MAX_NEW]
        reference = model.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert jacobi == reference


def test_rows_do_not_depend_on_their_batch(tiny):
    model, _ = tiny
    together = collect_trajectories(model, PROMPTS, n=N, max_new_tokens=MAX_NEW, eos_token_id=2, seeds=[3, 4, 5])
    alone = collect_trajectories(model, PROMPTS[1:2], n=N, max_new_tokens=MAX_NEW, eos_token_id=2, seeds=[4])
    assert together[1] == alone[0]


def test_eos_inside_a_fixed_point_ends_the_prompt(tiny):
    model, _ = tiny
    first = collect_trajectories(model, PROMPTS[:1], n=N, max_new_tokens=MAX_NEW, eos_token_id=None)[0]
    eos = first[1][1][-1][2]  # pretend a token of block 1 is EOS: collection must stop after block 1
    stopped = collect_trajectories(model, PROMPTS[:1], n=N, max_new_tokens=MAX_NEW, eos_token_id=eos)[0]
    cut = next(i for i, (_, states) in enumerate(first) if eos in states[-1])
    assert [s[-1] for _, s in stopped] == [s[-1] for _, s in first[: cut + 1]]


def test_cli_writes_shards_and_manifest_and_resumes(tmp_path, tiny, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(x):"}) + "\n" for i in range(5)))
    out = tmp_path / "data"
    argv = ["--model", "tiny", "--prompts", str(prompts), "--output", str(out), "--clean", "--n", "4"]
    argv += ["--max_new_tokens", "8", "--batch_size", "2", "--shard_size", "2", "--dtype", "float64"]
    main(argv)
    manifest = read_manifest(out)
    assert [s["records"] for s in manifest["shards"]] == [4, 4, 2]
    assert manifest["stats"]["prompts"] == 5 and manifest["n"] == 4 and manifest["clean"] is True
    records = [r for s in manifest["shards"] for r in read_records(out / s["file"], 4)]
    assert {r.prompt_id for r in records} == {f"p{i}" for i in range(5)}
    assert all(r.prefix_ids == [] if r.block_index == 0 else len(r.prefix_ids) == 4 for r in records)
    first = (out / "shard-00001.jsonl").read_bytes()
    (out / "shard-00001.jsonl").unlink()  # as if killed before shard 1 was written
    main(argv)
    assert (out / "shard-00001.jsonl").read_bytes() == first
    with pytest.raises(Exception, match="other settings"):
        main(argv[:-4] + ["--batch_size", "2", "--dtype", "float64", "--seed", "9"])


def test_a_collection_grows_by_whole_shards_and_never_shrinks(tmp_path, tiny):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(x):"}) + "\n" for i in range(6)))
    out, reference = tmp_path / "data", tmp_path / "reference"
    argv = ["--model", "tiny", "--prompts", str(prompts), "--n", "4", "--max_new_tokens", "8"]
    argv += ["--batch_size", "2", "--shard_size", "2", "--dtype", "float64"]
    main([*argv, "--output", str(out), "--limit", "4"])
    written = {f: (out / f).stat().st_mtime_ns for f in ("shard-00000.jsonl", "shard-00001.jsonl")}
    main([*argv, "--output", str(out), "--limit", "6"])  # grows: only shard 2 is collected
    assert {f: (out / f).stat().st_mtime_ns for f in written} == written
    main([*argv, "--output", str(reference), "--limit", "6"])
    grown, fresh = read_manifest(out), read_manifest(reference)
    assert [s["sha256"] for s in grown["shards"]] == [s["sha256"] for s in fresh["shards"]]
    assert grown["stats"]["prompts"] == 6 and grown["prompt_limit"] == 6
    with pytest.raises(UserError, match="holds a collection of 6 prompts .* gives 4; a collection grows, it never"):
        main([*argv, "--output", str(out), "--limit", "4"])
    settings = json.loads((out / "collection.json").read_text())
    del settings["prompt_digests"]  # as an older cllm wrote it: the prompts of its shards cannot be checked
    (out / "collection.json").write_text(json.dumps(settings))
    with pytest.raises(UserError, match="holds 6 prompts collected without prompt digests, this run gives 7"):
        prompts.write_text(prompts.read_text() + json.dumps({"id": "p6", "prompt": "def f6(x):"}) + "\n")
        main([*argv, "--output", str(out)])
    main([*argv, "--output", str(tmp_path / "odd"), "--limit", "3"])  # its last shard holds one prompt
    with pytest.raises(UserError, match="prompts of shard 1 .* a collection grows by whole shards"):
        main([*argv, "--output", str(tmp_path / "odd"), "--limit", "5"])


def test_clean_counts_dropped_records(tmp_path, tiny):
    model, tokenizer = tiny
    config = CollectSettings(model="tiny", prompts="unused", output=str(tmp_path), n=4, max_new_tokens=8, clean=True)
    collector = Collector.__new__(Collector)
    collector.config, collector.tokenizer = config, tokenizer
    from cllm.records import Prompt

    collector.prompts, collector.prompt_ids = [Prompt("a", "x")], [[1, 5]]
    blocks = [([], [[7] * 4]), ([7] * 4, [[9, 9, 9, 9]]), ([7] * 8, [[7, 7, 1, 2]])]
    records, dropped = collector._records(0, [(p, s) for p, s in blocks])
    # runs in the fixed points: 4, 4, 2 -> only runs >= 10 are dropped; none here
    assert dropped == 0 and len(records) == 3
    long_blocks = [([], [[7] * 12]), ([7] * 12, [[1, 2] * 6])]
    records, dropped = collector._records(0, long_blocks)
    assert dropped == 1 and [r.block_index for r in records] == [1]
    assert write_dataset_manifest  # imported for the CLI test above


def test_augment_and_labels(tmp_path, tiny):
    _, tokenizer = tiny
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "def f(x):", "answer": "return x"}) + "\n")
    out = tmp_path / "data"
    main(
        [
            "--model",
            "tiny",
            "--prompts",
            str(prompts),
            "--answer_field",
            "answer",
            "--labels",
            "--augment",
            "--output",
            str(out),
            "--n",
            "6",
            "--max_new_tokens",
            "12",
            "--dtype",
            "float64",
        ]
    )
    records = list(read_records(out / "shard-00000.jsonl", 6))
    assert all(r.labels == tokenizer("return x", add_special_tokens=False)["input_ids"] + [2] for r in records)
    augmented = [(r, a) for r in records for a in r.augmented_states]
    assert augmented, "a random model's trajectories have intermediate states with >= 2 wrong tokens"
    for record, state in augmented:
        wrong = sum(x != y for x, y in zip(state, record.fixed_point))
        assert 1 <= wrong and any(
            sum(x != y for x, y in zip(s, record.fixed_point)) > wrong
            and all(x == y or y == f for x, y, f in zip(s, state, record.fixed_point))
            for s in record.states[1:-1]
        )

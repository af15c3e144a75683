"""Importer of the official CLLM trajectory JSON: nesting variants, prefix derivation, labels, bad entries."""

from __future__ import annotations

import json

import pytest

from cllm.collection import main
from cllm.errors import UserError
from cllm.fingerprints import tokenizer_fingerprint
from cllm.models import build_tiny_tokenizer
from cllm.records import read_manifest, read_records

PROMPT = [1, 10, 11]
BLOCK0 = [[5, 5, 5], [20, 6, 6], [20, 21, 22]]
BLOCK1 = [[7, 7, 7], [23, 24, 25]]


def official_entries() -> list[dict]:
    """Two blocks of data_0 in the official layout (nested [[...]] as torch .tolist() wrote it), one of data_1."""
    entries = [
        {
            "data_id": "data_0",
            "jacobian_itr_id": "itr_0",
            "prompt_ids_len": [3],
            "prompt_ids": [PROMPT],
            "answer_trajectory_ids": [[s] for s in BLOCK0],
            "teacher_output_ids": [PROMPT + BLOCK0[-1]],
            "labels_ids": [PROMPT + [30, 31, 2]],
        },
        {
            "data_id": "data_0",
            "jacobian_itr_id": "itr_1",
            "prompt_ids_len": [3],
            "prompt_ids": [PROMPT + BLOCK0[-1]],
            "answer_trajectory_ids": BLOCK1,
            "teacher_output_ids": [PROMPT + BLOCK0[-1] + BLOCK1[-1]],
            "labels_ids": PROMPT + [30, 31, 2],
        },
        {
            "data_id": "data_1",
            "jacobian_itr_id": "itr_0",
            "prompt_ids_len": 2,
            "prompt_ids": [1, 12],
            "answer_trajectory_ids": [[9, 9, 9], [40, 41, 42]],
            "teacher_output_ids": [1, 12, 40, 41, 42],
        },
    ]
    return json.loads(json.dumps(entries))  # a deep copy: tests edit entries


def run_import(tmp_path, entries) -> tuple:
    source = tmp_path / "cleaned_gsm8k_jacobi.json"
    source.write_text(json.dumps(entries))
    out = tmp_path / "imported"
    main(["--import_official", str(source), "--model", "tiny", "--output", str(out)])
    return source, out


def test_official_file_becomes_our_records(tmp_path):
    _, out = run_import(tmp_path, official_entries())
    manifest = read_manifest(out)
    assert manifest["n"] == 3 and manifest["stats"] == {**manifest["stats"], "records": 3, "prompts": 2}
    assert manifest["tokenizer_fingerprint"] == tokenizer_fingerprint(build_tiny_tokenizer())
    assert manifest["imported_from"]["teacher_output_mismatches"] == 0
    records = list(read_records(out / manifest["shards"][0]["file"], 3))
    first, second, other = records
    assert (first.prompt_id, first.block_index, first.prompt_ids, first.prefix_ids) == ("data_0", 0, PROMPT, [])
    assert first.states == BLOCK0 and first.labels == [30, 31, 2]
    assert (second.block_index, second.prompt_ids, second.prefix_ids, second.states) == (1, PROMPT, BLOCK0[-1], BLOCK1)
    assert other.prompt_ids == [1, 12] and other.labels is None


def test_teacher_mismatch_is_counted(tmp_path):
    entries = official_entries()
    entries[2]["teacher_output_ids"] = [1, 12, 40, 41, 43]
    _, out = run_import(tmp_path, entries)
    assert read_manifest(out)["imported_from"]["teacher_output_mismatches"] == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda e: e[1].pop("prompt_ids"), r"entry 1 \(data_0, itr_1\): field 'prompt_ids' is missing"),
        (lambda e: e[1]["answer_trajectory_ids"].append([1, 2]), r"entry 1 .*'answer_trajectory_ids\[0\]' has 3"),
        (lambda e: e[2].update(jacobian_itr_id="3"), r"entry 2 .*'jacobian_itr_id' must look like 'itr_3'"),
        (lambda e: e[0].update(prompt_ids=[[1, "x"]]), r"entry 0 .*'prompt_ids' must be"),
    ],
)
def test_bad_entries_name_the_entry_and_field(tmp_path, change, message):
    entries = official_entries()
    change(entries)
    with pytest.raises(UserError, match=message):
        run_import(tmp_path, entries)

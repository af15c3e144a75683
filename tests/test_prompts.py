"""Prompt sources: jsonl, parquet, saved HF dataset folders, the bundled stdlib-code set; bad input."""

from __future__ import annotations

import json

import pytest

from cllm.data_modules.prompts import load_prompts
from cllm.data_modules.stdlib_code import functions_of, split_of
from cllm.errors import UserError

ROWS = [{"id": "a", "prompt": "say a", "answer": "a"}, {"prompt": "say b", "answer": "b"}]


def test_parquet_and_hf_folder_match_jsonl(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    for source in ["p.jsonl", "p.parquet", "single", "dict", "dict:train"]:
        prompts = load_prompts(str(tmp_path / source), answer_field="answer")
        assert [(p.text, p.answer) for p in prompts] == [("say a", "a"), ("say b", "b")], source
        assert prompts[0].id == "a"
    with pytest.raises(UserError, match="one of \\['train'\\]"):
        load_prompts(str(tmp_path / "dict:nope"))


def test_bad_rows_name_file_row_and_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.jsonl").write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(UserError, match=r"p.jsonl:2: field 'prompt' missing"):
        load_prompts(str(tmp_path / "p.jsonl"))
    pq.write_table(pa.Table.from_pylist([{"prompt": "x"}]), tmp_path / "p.parquet")
    with pytest.raises(UserError, match=r"p.parquet:row 1: field 'answer' missing"):
        load_prompts(str(tmp_path / "p.parquet"), answer_field="answer")


def test_empty_prompt_set_is_an_error(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        load_prompts(str(tmp_path / "empty.jsonl"))


SOURCE = '''
def documented(a, b=1):
    """Add two numbers."""
    c = a + b
    d = c * 2
    return d - c


def _private(x):
    """Hidden."""
    y = x
    z = y
    return z


class Box:
    def size(self):
        """The size."""
        total = 0
        for item in self.items:
            total += item
        return total

    def short(self):
        """Too short."""
        return 1
'''


def test_functions_of_picks_public_documented_functions_with_a_real_body():
    found = functions_of("demo", SOURCE)
    assert [f["id"] for f in found] == ["demo.documented", "demo.Box.size"]
    assert found[1]["stub"] == 'def size(self):\n    """The size."""'
    assert found[1]["answer"].startswith("def size(self):") and found[1]["answer"].endswith("return total")


def test_stdlib_code_splits_are_disjoint_by_package_and_deterministic():
    splits = {name: load_prompts(f"stdlib-code:{name}") for name in ("train", "validation", "test")}
    packages = {name: {p.meta["module"].split(".")[0] for p in prompts} for name, prompts in splits.items()}
    assert not packages["train"] & packages["validation"] and not packages["validation"] & packages["test"]
    assert len(splits["train"]) > 1000 and len(splits["validation"]) > 50 and len(splits["test"]) > 50
    assert all(split_of(p.meta["module"].split(".")[0]) == "validation" for p in splits["validation"])
    assert [p.id for p in load_prompts("stdlib-code:validation")] == [p.id for p in splits["validation"]]
    assert "```python\ndef " in splits["train"][0].text and splits["train"][0].answer.startswith(("def ", "@", "async"))

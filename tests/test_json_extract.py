"""The bundled narrow-domain set `json-extract`: deterministic, disjoint splits, answers that score exact."""

from __future__ import annotations

import hashlib
import json

import pytest

from cllm.data_modules import json_extract
from cllm.data_modules.prompts import load_prompts
from cllm.errors import UserError


def test_splits_are_deterministic_disjoint_and_complete():
    splits = {split: load_prompts(f"json-extract:{split}") for split in json_extract.SPLITS}
    assert sum(len(prompts) for prompts in splits.values()) == json_extract.SIZE
    assert 0.7 < len(splits["train"]) / json_extract.SIZE < 0.9
    texts = [p.text for prompts in splits.values() for p in prompts]
    assert len(set(texts)) == len(texts)
    # generated again from the seed: same ids, texts and answers
    again = load_prompts("json-extract:test")
    assert [(p.id, p.text, p.answer) for p in again] == [(p.id, p.text, p.answer) for p in splits["test"]]
    assert {p.meta["kind"] for p in splits["test"]} == set(json_extract.KINDS)


def test_prompt_asks_for_the_record_keys_and_the_answer_is_the_record():
    prompt = load_prompts("json-extract:validation", limit=1)[0]
    record = prompt.meta["record"]
    assert f"keys {', '.join(record)}." in prompt.text
    assert json.loads(prompt.answer) == record
    assert json_extract.score_output(prompt.answer, record) == {"valid": True, "exact": True, "fields": 1.0}


def test_score_output():
    record = {"name": "Maria Lopez", "age": 34, "city": "Boston"}
    fenced = '```json\n{"name": "maria lopez", "age": 34, "city": "Boston"}\n```'
    assert json_extract.score_output(fenced, record) == {"valid": True, "exact": True, "fields": 1.0}
    wrong = '{"name": "Maria Lopez", "age": "34", "city": "Boston"}'  # a string where a number belongs
    assert json_extract.score_output(wrong, record) == {"valid": True, "exact": False, "fields": 2 / 3}
    extra = '{"name": "Maria Lopez", "age": 34, "city": "Boston", "id": 1}'
    assert json_extract.score_output(extra, record)["exact"] is False
    for broken in ["no json here", '{"name": "Maria', "[1, 2]"]:
        assert json_extract.score_output(broken, record) == {"valid": False, "exact": False, "fields": 0.0}


def test_unknown_split_is_an_error():
    with pytest.raises(UserError, match="json-extract has splits"):
        load_prompts("json-extract:dev")


def test_the_set_is_frozen():
    """Published results depend on these exact prompts: a change to the generator must change this digest on
    purpose (and the results be rerun)."""
    prompts = json_extract.generate_all()
    digest = hashlib.sha256(repr([(p.id, p.text, p.answer) for p in prompts]).encode()).hexdigest()
    assert digest == "34683eb1e156dcf4bbb5ead7db9ac0ffd69dd1a646617592698e74e0567c6a08"

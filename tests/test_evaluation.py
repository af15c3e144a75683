"""HumanEval execution: canonical solutions pass, wrong/hanging/networking code fails, nothing runs in-process."""

import pytest

from cllm.data_modules.prompts import load_prompts
from cllm.evaluation import extract_code, humaneval_pass_at_1, run_sandboxed


@pytest.fixture(scope="module")
def problems():
    return [prompt.meta for prompt in load_prompts("humaneval", limit=3)]


def as_answer(problem, body):
    return f"Here you go:\n```python\n{problem['prompt']}{body}```\nDone."


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    right = [as_answer(p, p["canonical_solution"]) for p in problems]
    wrong = [as_answer(p, "    return None\n") for p in problems]
    assert humaneval_pass_at_1(problems, right) == [True, True, True]
    assert humaneval_pass_at_1(problems, wrong) == [False, False, False]


def test_time_limit_and_no_network():
    assert run_sandboxed("while True: pass", timeout=1.0) is False
    assert run_sandboxed("import socket; socket.socket()", timeout=5.0) is False
    assert run_sandboxed("print('ok')", timeout=5.0) is True


def test_extract_code_takes_the_first_block_or_the_text():
    assert extract_code("x\n```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```py\nc = 3") == "c = 3"

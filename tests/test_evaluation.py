"""HumanEval execution: canonical solutions pass, wrong/hanging/networking code fails, nothing runs in-process."""

import os

import pytest

from cllm import evaluation
from cllm.data_modules.prompts import load_prompts
from cllm.errors import UserError
from cllm.evaluation import extract_code, humaneval_pass_at_1, run_sandboxed

needs_sandbox = pytest.mark.skipif(
    evaluation.sandbox_problem() is not None and not os.environ.get("CI"), reason="no bubblewrap sandbox here"
)


@pytest.fixture(scope="module")
def problems():
    return [prompt.meta for prompt in load_prompts("humaneval", limit=3)]


def as_answer(problem, body):
    return f"Here you go:\n```python\n{problem['prompt']}{body}```\nDone."


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    right = [as_answer(p, p["canonical_solution"]) for p in problems]
    wrong = [as_answer(p, "    return None\n") for p in problems]
    assert humaneval_pass_at_1(problems, right) == [True, True, True]
    assert humaneval_pass_at_1(problems, wrong) == [False, False, False]


def test_extract_code_takes_the_first_block_or_the_text():
    assert extract_code("x\n```python\na = 1\n```\n```python\nb = 2\n```") == "a = 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```py\nc = 3") == "c = 3"


@pytest.mark.parametrize("unsafe_exec", [False, True])
def test_without_bubblewrap_it_refuses_unless_unsafe_exec(monkeypatch, unsafe_exec):
    monkeypatch.setattr(evaluation, "sandbox_problem", lambda: "bubblewrap (bwrap) is not installed")
    if unsafe_exec:
        assert run_sandboxed("print('ok')", timeout=5.0, unsafe_exec=True) is True
    else:
        with pytest.raises(UserError, match="install bubblewrap .* or pass --unsafe-exec"):
            run_sandboxed("print('ok')", timeout=5.0)

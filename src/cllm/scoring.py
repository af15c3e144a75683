"""Scoring outputs: task quality against the ground truth, agreement between two models' outputs.

`cllm evaluate` scores every output with `quality`; the accepted-tokens callback shares `common_prefix_fraction`
and `has_repeated_run`. Speed lives in one place, `cllm.timing` (the protocol of `cllm evaluate`).
"""

from __future__ import annotations

from cllm.data_modules.json_extract import score_output
from cllm.evaluation import humaneval_pass_at_1
from cllm.records import REPETITION_LIMIT, Prompt, longest_run


def common_prefix_fraction(output: list[int], reference: list[int]) -> float:
    """len(common prefix) / max(len(output), len(reference)); 1.0 for two empty outputs."""
    longest = max(len(output), len(reference))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(output, reference):
        if a != b:
            break
        same += 1
    return same / longest


def has_repeated_run(tokens: list[int], run: int = REPETITION_LIMIT) -> bool:
    """Whether `tokens` holds `run` identical tokens in a row (the degenerate-repetition symptom)."""
    return longest_run(tokens) >= run


def quality(set_name: str, prompts: list[Prompt], texts: list[str], unsafe_exec: bool = False) -> dict[str, float]:
    """Task quality against the ground truth: HumanEval pass@1 (sandboxed execution); json-extract valid/exact/
    field accuracy against the generating record (nothing is executed). Other sets have none.
    `unsafe_exec`: run HumanEval code without the bubblewrap sandbox where there is none."""
    if set_name == "humaneval":
        passed = humaneval_pass_at_1([p.meta for p in prompts], texts, unsafe_exec=unsafe_exec)
        return {"pass_at_1": sum(passed) / len(passed)}
    if set_name == "json-extract":
        scores = [score_output(text, p.meta["record"]) for p, text in zip(prompts, texts)]
        return {key: sum(s[key] for s in scores) / len(scores) for key in ("valid", "exact", "fields")}
    return {}


def agreement_with_base(outputs: list[list[int]], base: list[list[int]]) -> dict[str, float]:
    """How far a CLLM's outputs moved from the base model's: exact-match share and mean common-prefix share."""
    pairs = list(zip(outputs, base))
    return {
        "exact_match_vs_base": sum(a == b for a, b in pairs) / len(pairs),
        "common_prefix_vs_base": sum(common_prefix_fraction(a, b) for a, b in pairs) / len(pairs),
    }

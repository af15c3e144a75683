"""`python -m cllm bench`: the speed half of `cllm evaluate` (no quality scoring), same engine, same report.

    python -m cllm bench --model smollm2-135m --prompts json-extract:test --decoder jacobi --decoder recycle \\
        --output runs/bench

Every flag of `cllm evaluate` applies (`--base` for the training gain, `--timed`, `--repeats`, `--n_values`,
`--dtypes`, `--compile`); see `cllm.evaluate` for the protocol and `results.json`'s shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from cllm.arguments import parse_settings
from cllm.evaluate import EvaluateSettings, evaluate


@dataclass(kw_only=True)
class BenchSettings(EvaluateSettings):
    """`cllm bench`: `cllm evaluate` without quality scoring (`--quality` turns it back on).

    Args:
        quality: score the outputs too.
    """

    quality: bool = False


def main(argv: list[str]) -> None:
    evaluate(parse_settings(BenchSettings, argv, "cllm bench", __doc__), argv)

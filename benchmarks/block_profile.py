"""Where a decoder spends its passes: per 16-token stretch of the response, passes per prompt and tokens per pass.

Reads Spec-Bench answer files (`records/<model>/<suite>/<runner>.jsonl` of a `cllm evaluate` report); a pass is
credited to the stretch its first accepted token falls in. No model is loaded, nothing is timed.

    python benchmarks/block_profile.py --records docs/results/json-jf-long/records/*/json-extract/jacobi_n16_bf*.jsonl

json-jf-long's plain Jacobi (JF's 4-block windows) spends 9.5 of its 18.4 passes per prompt on the first 16 tokens
(1.87 tokens per pass there, 3.3 on the next 32): the stretch its noise schedule never trains (ratio 0).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError
from cllm.spec_bench import read_answers


@dataclass(kw_only=True)
class BlockProfileSettings:
    """`benchmarks/block_profile.py`: passes per stretch of the response, from answer files.

    Args:
        records: Spec-Bench answer files (`records/<model>/<suite>/<runner>.jsonl`).
        stretch: tokens per stretch.
    """

    records: list[str] = field(default_factory=list)
    stretch: int = 16


def profile(path: Path, stretch: int = 16, stretches: int = 4) -> dict:
    """{stretch index: (passes per prompt, tokens per pass)}; the last stretch takes everything after it."""
    lines = read_answers(path)
    accepted = defaultdict(list)
    for line in lines:
        position = 0
        for length in line["choices"][0]["accept_lengths"]:
            accepted[min(position // stretch, stretches - 1)].append(length)
            position += length
    return {k: (len(v) / len(lines), sum(v) / len(v)) for k, v in sorted(accepted.items())}


def main(argv: list[str]) -> None:
    args = parse_settings(BlockProfileSettings, argv, "benchmarks/block_profile.py", __doc__)
    if not args.records:
        raise UserError("--records: give at least one answer file")
    for path in map(Path, args.records):
        if not path.is_file():
            raise UserError(f"--records: {path} is not a file")
        rows = profile(path, args.stretch)
        total = sum(passes for passes, _ in rows.values())
        cells = "  ".join(
            f"tokens {k * args.stretch}-{'' if k == len(rows) - 1 else (k + 1) * args.stretch - 1}: "
            f"{passes:.1f} passes x {rate:.2f}"
            for k, (passes, rate) in rows.items()
        )
        print(f"{path}: {total:.1f} passes/prompt  {cells}")


if __name__ == "__main__":
    run_script(main)

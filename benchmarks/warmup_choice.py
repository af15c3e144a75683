"""How much choosing a runner on K prompts costs, from the records of existing reports: the prompt sample alone.

    python benchmarks/warmup_choice.py --reports docs/results/json-one-block-1536-320 docs/results/json-one-block-long

`cllm evaluate` chooses each model's fastest runner on `--warmup` prompts (2 by default) that are then not timed.
For every model and prompt set of a report, this reads each runner's per-prompt tokens/s back from the Spec-Bench
records (the timed prompts, `cllm.spec_bench.timed_rates`), takes the runner with the highest median
over all of them as the right choice, and draws K of those prompts at random (2000 draws, seed 0) to choose on, as a
warm-up would: how often the choice is another runner, and what it costs on average (1 - the chosen runner's median
over the right one's). Timing drift between rounds is not in it (every runner here was timed side by side), so a
report whose warm-up choice cost more than this table says lost it to drift, not to the prompts.
"""

from __future__ import annotations

import json
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from cllm.arguments import parse_settings, run_script
from cllm.errors import UserError
from cllm.spec_bench import timed_rates

DRAWS = 2000


@dataclass(kw_only=True)
class WarmupChoiceSettings:
    """`benchmarks/warmup_choice.py`: the prompt-sample cost of a warm-up choice, from reports' records.

    Args:
        reports: report folders (results.json and records/).
        k: warm-up sizes to simulate.
    """

    reports: list[str] = field(default_factory=list)
    k: list[int] = field(default_factory=lambda: [2, 4, 8])


def choice_cost(runners: dict[str, list[float]], k: int, seed: int = 0) -> tuple[float, float]:
    """(share of K-prompt draws that choose another runner than the one fastest over all prompts, mean cost)."""
    count = min(map(len, runners.values()))
    medians = {label: statistics.median(rates[:count]) for label, rates in runners.items()}
    best = max(medians, key=medians.get)
    rng, wrong, cost = random.Random(seed), 0, 0.0
    for _ in range(DRAWS):
        drawn = rng.sample(range(count), k)
        pick = max(runners, key=lambda label: statistics.median(runners[label][i] for i in drawn))
        wrong += pick != best
        cost += 1 - medians[pick] / medians[best]
    return wrong / DRAWS, cost / DRAWS


def main(argv: list[str]) -> None:
    args = parse_settings(WarmupChoiceSettings, argv, "benchmarks/warmup_choice.py", __doc__)
    print(
        "| report | model | set | prompts | warm-up choice | " + " | ".join(f"K={k} wrong, cost" for k in args.k) + " |"
    )
    print("|---|---|---|---|---|" + "---|" * len(args.k))
    for folder in map(Path, args.reports):
        path = folder / "results.json"
        if not path.is_file():
            raise UserError(f"{path}: no such report")
        report = json.loads(path.read_text())
        for model, suites in report["models"].items():
            for suite, entry in suites.items():
                if not isinstance(entry, dict) or "decoders" not in entry:  # a model's name, path, ...
                    continue
                runners = timed_rates(folder, entry)
                if min(map(len, runners.values())) < max(args.k):
                    continue
                cells = [choice_cost(runners, k) for k in args.k]
                print(
                    f"| {folder.name} | {model} | {suite} | {entry['timed_prompts']} | {entry['fastest']} | "
                    + " | ".join(f"{wrong:.2f}, {cost:.1%}" for wrong, cost in cells)
                    + " |"
                )


if __name__ == "__main__":
    run_script(main)

"""Per-sample records as Spec-Bench answer files (hemingkx/Spec-Bench, `evaluation/speed.py` reads them).

One jsonl line per prompt:

    {"question_id": ID, "answer_id": I, "model_id": "MODEL:RUNNER", "category": SUITE, "tstamp": T,
     "choices": [{"index": 0, "turns": [TEXT], "new_tokens": [N], "wall_time": [S], "accept_lengths": [a1, a2, ...]}]}

Spec-Bench's arithmetic, which `speed` reimplements (so our report states the figure Spec-Bench would print):

- the method's speed per sample = sum(new_tokens) / sum(wall_time); the baseline's = (len(tokenizer(turn).input_ids)
  - 1, summed over turns) / sum(wall_time): it re-tokenises the baseline's answer text and drops one token for the
  BOS a Llama tokenizer adds (a tokenizer that adds none loses one real token per sample);
- speedup = mean of the method's per-sample speeds / mean of the baseline's;
- mean accepted tokens = the mean of every pass's accepted length, pooled over samples
  (`tokens_per_step_pooled` in our reports; ours, `tokens_per_step`, averages per sequence first).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from cllm.errors import UserError
from cllm.files import atomic_write_text


def answer_lines(
    ids: Sequence[str],
    texts: Sequence[str],
    tokens: Sequence[Sequence[int]],
    passes: Sequence[Sequence[int]],
    seconds: Sequence[float],
    *,
    model_id: str,
    category: str,
) -> list[dict]:
    """The answer records of one runner on one prompt set."""
    stamp = time.time()
    return [
        {
            "question_id": sample_id,
            "answer_id": index,
            "model_id": model_id,
            "category": category,
            "tstamp": stamp,
            "choices": [
                {
                    "index": 0,
                    "turns": [text],
                    "new_tokens": [len(ids_)],
                    "wall_time": [wall],
                    "accept_lengths": list(accepted),
                }
            ],
        }
        for index, (sample_id, text, ids_, accepted, wall) in enumerate(zip(ids, texts, tokens, passes, seconds))
    ]


def write_answers(path: Path, lines: list[dict]) -> None:
    """Write one answer file (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in lines))


def read_answers(path: Path, category: str | None = None) -> list[dict]:
    """The answers of one file, those of `category` only when given (Spec-Bench filters every task but `overall`)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line for line in lines if category is None or line["category"] == category]


def answer_rate(answer: dict) -> float:
    """Tokens/s of one answer: its new tokens over its wall time, summed over turns (prefill included)."""
    return sum(answer["choices"][0]["new_tokens"]) / sum(answer["choices"][0]["wall_time"])


def speed(method: list[dict], baseline: list[dict], tokenizer) -> dict:
    """Spec-Bench's figures for `method` against `baseline` answers (see the module docstring)."""
    speeds = [answer_rate(a) for a in method]
    accepted = [length for a in method for length in a["choices"][0]["accept_lengths"]]
    base = []
    for answer in baseline:
        count = sum(len(tokenizer(turn).input_ids) - 1 for turn in answer["choices"][0]["turns"])
        base.append(count / sum(answer["choices"][0]["wall_time"]))
    return {
        "tokens_per_s": statistics.fmean(speeds),
        "baseline_tokens_per_s": statistics.fmean(base),
        "speedup": statistics.fmean(speeds) / statistics.fmean(base),
        "mean_accepted_tokens": statistics.fmean(accepted) if accepted else 0.0,
    }


def timed_rates(folder: Path, entry: dict) -> dict[str, list[float]]:
    """Runner label -> its per-prompt tokens/s on the timed prompts, read back from the records of one model on one
    prompt set (`entry`: `models.<model>.<suite>` of the report in `folder`); AR and every decoder, as timed."""
    labels = {"ar": entry["ar"]["variant"]} | {name: d["setting"] for name, d in entry["decoders"].items()}
    runners = {}
    for key, label in labels.items():
        path = folder / entry["records"][key]
        if not path.is_file():
            raise UserError(f"{path}: records missing; this figure needs every runner's")
        runners[label] = [answer_rate(answer) for answer in read_answers(path)[: entry["timed_prompts"]]]
    return runners

"""The timing protocol of `cllm evaluate`: paired per-prompt timing, rotating order, bootstrap intervals.

A noisy machine (2 shared cores, turbo, other processes) moves tokens/s by 20-50% between runs minutes apart, so a
ratio of two separately timed blocks is mostly noise. The protocol pairs instead:

- every runner (AR and each decoder, of every model) decodes the same prompt back to back, in an order that
  rotates from prompt to prompt and repeat to repeat (drift lands on every runner alike, not on one);
- each runner's time on a prompt is the minimum of R repeats (timeit's rule: interference only ever adds time);
- a speedup is the **median of the per-prompt ratios** of tokens/s, with a 95% percentile-bootstrap interval over
  prompts; the ratio of totals and Spec-Bench's ratio of mean rates are reported beside it, each named.

Everything here is pure except `time_paired` (which calls the runners) and `pass_seconds` (which runs a model).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cllm.jacobi import cache_argument

# prompt ids -> (generated ids, tokens committed by each decode pass)
Runner = Callable[[list[int]], tuple[list[int], list[int]]]
RESAMPLES = 10_000


@dataclass
class Timings:
    """One runner over the timed prompts: per prompt, its output, tokens per pass and the fastest of R wall times."""

    tokens: list[list[int]] = field(default_factory=list)
    passes: list[list[int]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def rates(self) -> list[float]:
        """Per-prompt tokens/s (prefill included)."""
        return [len(t) / max(s, 1e-9) for t, s in zip(self.tokens, self.seconds)]

    @property
    def tokens_per_step(self) -> float:
        """Generated tokens / decode passes per sequence, averaged over sequences (cllm's convention)."""
        rates = [len(t) / max(len(p), 1) for t, p in zip(self.tokens, self.passes)]
        return statistics.fmean(rates) if rates else 0.0

    @property
    def tokens_per_step_pooled(self) -> float:
        """All generated tokens / all decode passes (Spec-Bench's mean accepted length: pooled over passes)."""
        return sum(map(len, self.tokens)) / max(sum(map(len, self.passes)), 1)


def rotation(names: Sequence[str], turn: int) -> list[str]:
    """`names` rotated left by `turn`: over len(names) turns each runner takes every place in the order once."""
    shift = turn % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def time_paired(runners: dict[str, Runner], prompts: list[list[int]], repeats: int) -> dict[str, Timings]:
    """Decode each prompt with every runner back to back, `repeats` times in rotating order; keep each minimum.

    A runner must give the same output on every repeat (greedy decoding is deterministic); a change is a bug, and
    raises rather than timing two different outputs as one."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(runners)
    result = {name: Timings() for name in names}
    for index, prompt in enumerate(prompts):
        best: dict[str, tuple[float, list[int], list[int]]] = {}
        for repeat in range(repeats):
            for name in rotation(names, index * repeats + repeat):
                start = time.perf_counter()
                tokens, passes = runners[name](prompt)
                seconds = time.perf_counter() - start
                if name in best and best[name][1] != tokens:
                    raise RuntimeError(f"{name} decoded prompt {index} differently on repeat {repeat + 1}")
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tokens, passes)
        for name, (seconds, tokens, passes) in best.items():
            result[name].tokens.append(tokens)
            result[name].passes.append(passes)
            result[name].seconds.append(seconds)
    return result


def bootstrap(
    values: Sequence[float],
    statistic: Callable[[Sequence[float]], float] = statistics.median,
    *,
    confidence: float = 0.95,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """(statistic, (lo, hi)): the sample's `statistic` (median by default) and its percentile-bootstrap interval
    (resampling values with replacement, `resamples` times, a fixed seed so a report is reproducible from its
    records)."""
    if not values:
        raise ValueError("no values to bootstrap")
    rng = random.Random(seed)
    count = len(values)
    draws = sorted(statistic(rng.choices(values, k=count)) for _ in range(resamples))
    tail = (1.0 - confidence) / 2
    lo = draws[int(tail * (resamples - 1))]
    hi = draws[int(round((1.0 - tail) * (resamples - 1)))]
    return statistic(values), (lo, hi)


def bootstrap_median(
    values: Sequence[float], *, confidence: float = 0.95, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """(median, (lo, hi)): `bootstrap` of the median."""
    return bootstrap(values, statistics.median, confidence=confidence, resamples=resamples, seed=seed)


def paired_speedup(candidate: Timings, baseline: Timings, *, seed: int = 0) -> dict:
    """Speedup of `candidate` over `baseline` on the same prompts, in the three conventions, each named:

    - `median`, `ci95`: median over prompts of (candidate tokens/s / baseline tokens/s) and its bootstrap interval;
    - `ratio_of_totals`: (sum tokens / sum seconds) over the same of the baseline;
    - `spec_bench`: mean per-prompt tokens/s over the baseline's mean (Spec-Bench's figure, with both sides'
      token counts as generated; `cllm.spec_bench` recomputes it from the records as Spec-Bench does)."""
    if len(candidate.seconds) != len(baseline.seconds) or not candidate.seconds:
        raise ValueError("paired speedup needs the same, non-empty set of prompts on both sides")
    ratios = [c / max(b, 1e-9) for c, b in zip(candidate.rates, baseline.rates)]
    median, (lo, hi) = bootstrap_median(ratios, seed=seed)
    totals = (sum(map(len, candidate.tokens)) / sum(candidate.seconds)) / (
        sum(map(len, baseline.tokens)) / sum(baseline.seconds)
    )
    return {
        "median": median,
        "ci95": [lo, hi],
        "ratio_of_totals": totals,
        "spec_bench": statistics.fmean(candidate.rates) / max(statistics.fmean(baseline.rates), 1e-9),
        "n_prompts": len(ratios),
        "per_prompt": ratios,
    }


def cross_fitted_gain(
    trained: dict[str, Sequence[float]], base: dict[str, Sequence[float]], *, folds: int = 2, seed: int = 0
) -> dict | None:
    """The training gain with each side's runner chosen on other prompts than those it is compared on; each side
    maps a runner's label to its per-prompt tokens/s (`Timings.rates`) on the same timed prompts.

    The timed prompts split into `folds` interleaved folds (prompt i in fold i % folds). For each fold, each side's
    runner is the one with the highest median per-prompt tokens/s on the other folds, and the fold's prompts give
    per-prompt ratios of those two; the median and bootstrap interval are over all prompts' ratios. Unlike a choice
    on a few warm-ups, it uses every timed prompt to choose, and unlike a choice on the compared prompts themselves,
    no prompt's ratio comes from a choice it took part in. None with fewer than two prompts per fold."""
    count = len(next(iter(trained.values())))
    if count < 2 * folds:
        return None

    def fastest(side: dict[str, Sequence[float]], keep: list[int]) -> str:
        return max(side, key=lambda name: statistics.median(side[name][i] for i in keep))

    ratios: list[float] = [0.0] * count
    chosen = []
    for fold in range(folds):
        held = [i for i in range(count) if i % folds == fold]
        rest = [i for i in range(count) if i % folds != fold]
        picked = fastest(trained, rest), fastest(base, rest)
        for i in held:
            ratios[i] = trained[picked[0]][i] / max(base[picked[1]][i], 1e-9)
        chosen.append({"trained_decoder": picked[0], "base_decoder": picked[1], "n_prompts": len(held)})
    median, (lo, hi) = bootstrap_median(ratios, seed=seed)
    return {"median": median, "ci95": [lo, hi], "n_prompts": count, "folds": chosen}


def agreeing_speedup(candidate: Timings, baseline: Timings, *, seed: int = 0) -> dict | None:
    """`paired_speedup` over only the prompts whose output equals the baseline's (None when there are none)."""
    keep = [i for i, (a, b) in enumerate(zip(candidate.tokens, baseline.tokens)) if a == b]
    if not keep:
        return None

    def subset(t: Timings) -> Timings:
        return Timings([t.tokens[i] for i in keep], [t.passes[i] for i in keep], [t.seconds[i] for i in keep])

    figures = paired_speedup(subset(candidate), subset(baseline), seed=seed)
    figures.pop("per_prompt")
    return figures


def agreement(candidate: Timings, baseline: Timings) -> float:
    """Share of prompts whose output equals the baseline's token for token."""
    pairs = list(zip(candidate.tokens, baseline.tokens))
    return sum(a == b for a, b in pairs) / max(len(pairs), 1)


@torch.no_grad()
def pass_seconds(model: torch.nn.Module, context: int, width: int, repeats: int = 10) -> float:
    """Median seconds of one forward over `width` new tokens after a `context`-token KV cache (cropped back after
    every pass, so each pass sees the same cache, as a decode step does). Random ids: the cost is the shape's."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, context), generator=generator).to(device)
    tokens = torch.randint(0, vocab, (1, width), generator=generator).to(device)
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, use_cache=True, logits_to_keep=1, **cache_argument(model, cache))
    positions = torch.arange(context, context + width, device=device)[None]
    times = []
    for _ in range(repeats + 1):  # the first pass is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(input_ids=tokens, position_ids=positions, use_cache=True, **cache_argument(model, cache))
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cache.crop(-width)
    return statistics.median(times[1:])


def conversion_efficiency(speedup: float, tokens_per_step: float, cost_one: float, cost_width: float) -> float:
    """Measured speedup / the speedup acceptance allows, tokens_per_step x c(1) / c(width): the share of what the
    accepted tokens could buy that the decoder delivers (1.0: no overhead beyond the forward pass)."""
    return speedup / max(tokens_per_step * cost_one / max(cost_width, 1e-12), 1e-12)

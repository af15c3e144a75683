"""The timing protocol (`cllm.timing`) on hand-made timings: bootstrap coverage, rotation, minimum of repeats."""

import random
import statistics

import pytest

from cllm import timing
from cllm.timing import (
    Timings,
    agreeing_speedup,
    bootstrap,
    bootstrap_median,
    conversion_efficiency,
    cross_fitted_gain,
    paired_speedup,
    rotation,
    time_paired,
)


def test_rotation_puts_every_runner_in_every_place_once():
    names = ["ar", "jacobi", "recycle"]
    orders = [rotation(names, turn) for turn in range(3)]
    assert orders == [["ar", "jacobi", "recycle"], ["jacobi", "recycle", "ar"], ["recycle", "ar", "jacobi"]]
    assert rotation(names, 4) == orders[1]


def test_time_paired_rotates_and_keeps_each_minimum(monkeypatch):
    # 2 prompts x 2 repeats x 2 runners = 8 calls; the clock advances by the scripted durations below
    durations = iter([5.0, 1.0, 2.0, 3.0, 4.0, 8.0, 6.0, 7.0])
    now = [0.0]
    pending = []

    def clock():
        if pending:  # the end of a call: advance by its duration
            now[0] += pending.pop()
        else:
            pending.append(next(durations))
        return now[0]

    monkeypatch.setattr(timing.time, "perf_counter", clock)
    calls = []

    def runner(name):
        def run(prompt):
            calls.append((name, tuple(prompt)))
            return [7] * len(prompt), [len(prompt)]

        return run

    result = time_paired({"a": runner("a"), "b": runner("b")}, [[1, 2], [3]], repeats=2)
    # turn = prompt * repeats + repeat: prompt 0 -> a b, b a; prompt 1 -> a b, b a
    assert [c[0] for c in calls] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    # prompt 0: a took 5 then 3 -> 3; b took 1 then 2 -> 1; prompt 1: a 4 then 7 -> 4; b 8 then 6 -> 6
    assert result["a"].seconds == [3.0, 4.0] and result["b"].seconds == [1.0, 6.0]
    assert result["a"].rates == [2 / 3.0, 1 / 4.0]


def test_time_paired_refuses_a_runner_whose_output_changes():
    outputs = iter([[1], [2]])
    with pytest.raises(RuntimeError, match="differently on repeat 2"):
        time_paired({"x": lambda p: (next(outputs), [1])}, [[5]], repeats=2)


def test_bootstrap_interval_covers_a_known_ratio():
    # per-prompt ratios = 1.5 x log-normal noise (median 1): the interval must cover 1.5, and shrink with more prompts
    rng = random.Random(3)
    ratios = [1.5 * rng.lognormvariate(0, 0.2) for _ in range(32)]
    median, (lo, hi) = bootstrap_median(ratios)
    assert median == statistics.median(ratios)
    assert lo < 1.5 < hi and hi - lo < 0.3
    more = [1.5 * rng.lognormvariate(0, 0.2) for _ in range(512)]
    _, (lo2, hi2) = bootstrap_median(more)
    assert lo2 < 1.5 < hi2 and (hi2 - lo2) < (hi - lo) / 2


def test_bootstrap_covers_the_true_median_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered = 0
    for trial in range(200):
        values = [rng.lognormvariate(0, 0.3) for _ in range(31)]  # true median 1.0
        _, (lo, hi) = bootstrap_median(values, resamples=500, seed=trial)
        covered += lo <= 1.0 <= hi
    assert 0.88 <= covered / 200 <= 0.995


def test_bootstrap_of_the_mean_covers_a_skewed_sample_mean_and_not_its_median():
    # exponential values: mean 1.0, median ln 2 = 0.69; 400 of them pin the mean's interval well away from the median
    rng = random.Random(5)
    values = [rng.expovariate(1.0) for _ in range(400)]
    mean, (lo, hi) = bootstrap(values, statistics.fmean, resamples=2000)
    assert mean == statistics.fmean(values) and lo < mean < hi
    assert lo < 1.0 < hi and lo > 0.8
    assert bootstrap(values, resamples=2000) == bootstrap_median(values, resamples=2000)


def test_paired_speedup_hand_computed():
    # decoder: 10 tokens in 1 s, 30 in 2 s (10/s, 15/s); AR: 10 in 2 s, 30 in 10 s (5/s, 3/s)
    decoder = Timings(tokens=[[1] * 10, [1] * 30], passes=[[5, 5], [10] * 3], seconds=[1.0, 2.0])
    ar = Timings(tokens=[[1] * 10, [1] * 30], passes=[[1] * 10, [1] * 30], seconds=[2.0, 10.0])
    figures = paired_speedup(decoder, ar)
    assert figures["per_prompt"] == [2.0, 5.0] and figures["median"] == 3.5
    assert figures["ratio_of_totals"] == pytest.approx((40 / 3) / (40 / 12))  # 4.0
    assert figures["spec_bench"] == pytest.approx(12.5 / 4.0)
    assert decoder.tokens_per_step == pytest.approx((10 / 2 + 30 / 3) / 2)  # 7.5, per sequence
    assert decoder.tokens_per_step_pooled == pytest.approx(40 / 5)  # 8.0, pooled over passes


def test_agreeing_speedup_keeps_only_the_prompts_equal_to_ar():
    decoder = Timings(tokens=[[1, 2], [3, 4]], passes=[[2], [2]], seconds=[1.0, 1.0])
    ar = Timings(tokens=[[1, 2], [3, 5]], passes=[[1, 1], [1, 1]], seconds=[4.0, 2.0])
    figures = agreeing_speedup(decoder, ar)
    assert figures["n_prompts"] == 1 and figures["median"] == 4.0
    assert agreeing_speedup(decoder, Timings([[9], [9]], [[1], [1]], [1.0, 1.0])) is None


def test_conversion_efficiency_hand_computed():
    # 4 tokens/step, a 16-token pass costs 2x a 1-token pass: acceptance allows 2x; 1.5x measured -> 0.75
    assert conversion_efficiency(1.5, 4.0, 0.01, 0.02) == pytest.approx(0.75)


def test_cross_fitted_gain_chooses_each_half_on_the_other_hand_computed():
    trained = {"A": [10, 10, 10, 10], "B": [20, 1, 20, 1]}  # tokens/s per prompt; B fast on even prompts only
    base = {"X": [5, 5, 5, 5], "Y": [2, 2, 2, 2]}
    gain = cross_fitted_gain(trained, base)
    # even prompts are judged by a choice on the odd ones (A: 10 vs B: 1 -> A), odd ones by the even (B: 20 -> B)
    assert [(f["trained_decoder"], f["base_decoder"]) for f in gain["folds"]] == [("A", "X"), ("B", "X")]
    assert gain["median"] == pytest.approx((2.0 + 0.2) / 2) and gain["n_prompts"] == 4  # ratios 2, 0.2, 2, 0.2
    assert gain["ci95"][0] == pytest.approx(0.2) and gain["ci95"][1] == pytest.approx(2.0)
    assert cross_fitted_gain({"A": [1, 1, 1]}, {"X": [1, 1, 1]}) is None  # under 2 prompts a fold

"""Spec-Bench's speed figures, the AR winner and `--n auto`'s choice, on hand-made runs."""

import pytest

from cllm.speed import Run, choose_n, fastest, per_sample_rate, spec_bench_speedup


def test_spec_bench_speedup_is_the_mean_of_per_sample_rates():
    # Two samples: 10 tokens in 1 s and 30 tokens in 1 s (mean 20/s); our pooled rate is 40 / 2 = 20/s too here,
    # but the baseline's pooled (12 / 4 = 3/s) and per-sample (mean(2, 6) = 4/s) rates differ.
    run = Run("x", [[1] * 10, [1] * 30], [[5, 5], [10, 10, 10]], [1.0, 1.0], [1.0, 1.0])
    baseline = Run("ar", [[1] * 6, [1] * 6], [[1] * 6, [1] * 6], [3.0, 1.0], [3.0, 1.0])
    assert per_sample_rate(run) == 20.0 and per_sample_rate(baseline) == 4.0
    assert spec_bench_speedup(run, baseline) == 5.0
    figures = run.figures(reference=[[1] * 10, [2]])
    assert figures["accepted_tokens_per_step"] == (10 / 2 + 30 / 3) / 2
    assert figures["steps"] == 5 and figures["ar_agreement"] == 0.5 and figures["tokens_per_s"] == 20.0


def test_a_batch_is_timed_once():
    run = Run("x", [[1] * 4, [1] * 2], [[4], [2]], [2.0, 2.0], [2.0])  # one batch of two samples, 2 s
    assert run.seconds == 2.0 and run.figures()["tokens_per_s"] == 3.0


def test_fastest_ar_wins():
    slow = Run("eager", [[1] * 10], [[1] * 10], [2.0], [2.0])
    quick = Run("compiled", [[1] * 10], [[1] * 10], [1.0], [1.0])
    assert fastest([slow, quick]).name == "compiled"


def test_n_auto_maximises_tokens_per_step_over_pass_cost():
    # n=4: 2 tokens/pass at 0.1 s/pass (20 tok/s); n=16: 3 tokens/pass at 0.3 s/pass (10 tok/s)
    figures = {4: (2, 0.1), 16: (3, 0.3)}

    def measure(n):
        tpf, cost = figures[n]
        return Run("j", [[1] * (tpf * 5)], [[tpf] * 5], [5 * cost], [5 * cost])

    n, table = choose_n(measure, [4, 16])
    assert n == 4
    assert [row["score"] for row in table] == pytest.approx([20.0, 10.0])


def test_timed_keeps_the_fastest_of_its_repeats(monkeypatch):
    from cllm import scoring

    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 23.0])  # runs of 5 s, 1 s and 3 s
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: next(clock))
    calls = []
    value, seconds = scoring._timed(lambda x: calls.append(x) or len(calls), "x", repeats=3)
    assert (value, seconds, len(calls)) == (2, 1.0, 3)


def test_speed_times_each_decoder_in_every_dtype_and_reports_its_fastest():
    from cllm.models import load_model
    from cllm.scoring import speed

    models = {}
    for dtype in ("float32", "float64"):
        models[dtype], tokenizer = load_model("tiny", dtype=dtype)
    models["float64"].load_state_dict(models["float32"].state_dict())  # one model in two dtypes
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    result = speed(models, tokenizer, prompts, max_new_tokens=6, n_values=[4], decoders=("jacobi", "recycle"))
    assert set(result["ar"]) == {"float32", "float64"} and result["fastest_ar_dtype"] in result["ar"]
    for name in ("jacobi", "recycle"):
        entry = result["decoders"][name]["4"]
        assert set(entry["by_dtype"]) == {"float32", "float64"}
        assert entry["dtype"] == max(entry["by_dtype"], key=lambda d: entry["by_dtype"][d]["tokens_per_s"])
        assert all(timed["ar_agreement"] == 1.0 for timed in entry["by_dtype"].values())  # against AR in its dtype
    assert result["other_cpu_share"] is None or 0.0 <= result["other_cpu_share"] <= 1.0


def test_compiled_ar_joins_the_baselines_and_agrees_with_eager_ar():
    from cllm.models import load_model
    from cllm.scoring import speed

    model, tokenizer = load_model("tiny", dtype="float32")
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    result = speed({"float32": model}, tokenizer, prompts, max_new_tokens=6, n_values=[4], compile_ar=True)
    assert set(result["ar"]) == {"float32", "compiled float32"}, result.get("compile_failures")
    compiled = result["ar"]["compiled float32"]
    assert compiled["eager_agreement"] == 1.0 and compiled["compile_s"] > 0 and compiled["dtype"] == "float32"
    fastest = result["fastest_ar"]
    assert fastest == max(result["ar"], key=lambda name: result["ar"][name]["tokens_per_s"])
    assert result["fastest_ar_dtype"] == "float32"
    jacobi = result["decoders"]["jacobi"]["4"]
    ratio = jacobi["tokens_per_s"] / result["ar"][fastest]["tokens_per_s"]
    assert abs(jacobi["speedup_vs_fastest_ar"] - ratio) < 1e-9


def test_a_compiler_failure_is_a_recorded_result(monkeypatch):
    from cllm import scoring
    from cllm.models import load_model

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(scoring, "compiled_ar", broken)
    model, tokenizer = load_model("tiny", dtype="float32")
    result = scoring.speed({"float32": model}, tokenizer, [[5, 6, 7]], max_new_tokens=4, n_values=[4], compile_ar=True)
    assert set(result["ar"]) == {"float32"} and result["fastest_ar"] == "float32"
    assert "no C++ compiler" in result["compile_failures"]["compiled float32"]

"""`cllm evaluate` on tiny models: the JSON shape, warm-ups never timed, the budget knob, the choices, and the
Spec-Bench records read by an independent reimplementation of Spec-Bench's arithmetic."""

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import pytest

from cllm import timing
from cllm.evaluate import EvaluateSettings, evaluate
from cllm.evaluate_figures import tokens_per_step_non_degenerate
from cllm.models import build_tiny_tokenizer
from cllm.runners import Candidate, choose, choose_fastest
from cllm.timing import Timings

FIXTURE = Path(__file__).parent / "fixtures" / "evaluate"


def prompt_file(tmp_path: Path, count: int) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"x{i} = {i} + {i} *"}) + "\n" for i in range(count)))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    settings = EvaluateSettings(
        model="tiny",
        base="tiny:seed=3",
        prompts=[str(prompt_file(folder, 6))],
        n=4,
        n_values=[2, 4],
        max_new_tokens=10,
        dtypes=["float64"],
        compile=False,
        decoder=["jacobi", "recycle", "multiblock"],
        repeats=2,
        warmup=2,
        output=str(folder / "out"),
    )
    return evaluate(settings), folder / "out"


def test_results_json_has_the_documented_shape(report):
    results, out = report
    assert json.loads((out / "results.json").read_text())["training_gain"] == results["training_gain"]
    entry = results["models"]["cllm"]["set"]
    assert entry["ar"]["variant"] == "ar eager float64" and entry["ar"]["tokens_per_s"] > 0
    for decoder in ("jacobi", "recycle", "multiblock"):
        figures = entry["decoders"][decoder]
        assert figures["n"] in (2, 4) and figures["dtype"] == "float64"
        speed = figures["speedup_vs_ar"]
        assert set(speed) == {"median", "ci95", "ratio_of_totals", "spec_bench", "n_prompts"}
        assert speed["ci95"][0] <= speed["median"] <= speed["ci95"][1] and speed["n_prompts"] == 4
        assert figures["agreement_with_ar"] == 1.0  # float64: every decoder is lossless
        assert figures["tokens_per_step"] >= 1.0 and figures["tokens_per_step_pooled"] >= 1.0
        clean = figures["tokens_per_step_non_degenerate"]
        assert (clean is None) == (figures["degenerate_rate"] == 1.0) and (clean is None or clean >= 1.0)
        assert figures["conversion_efficiency"] > 0
    gain = results["training_gain"]["set"]
    assert gain["n_prompts"] == 4 and gain["trained_decoder"] == entry["fastest"]
    final = entry["fastest_choice"]  # the kinds' winners, timed side by side: the fastest is its maximum
    assert set(final) == {"ar eager float64"} | {d["setting"] for d in entry["decoders"].values()}
    assert entry["fastest"] == max(final, key=final.get)
    assert gain["base_decoder"] == results["models"]["base"]["set"]["fastest"]
    crossed, labels = gain["cross_fitted"], {d["setting"] for d in entry["decoders"].values()} | {"ar eager float64"}
    assert crossed["n_prompts"] == 4 and [f["n_prompts"] for f in crossed["folds"]] == [2, 2]
    assert all(f["trained_decoder"] in labels for f in crossed["folds"])
    assert set(results["machine"]) >= {"cpu_flags", "torch_threads", "load_during_timing", "under_load"}
    assert "Training gain" in (out / "results.md").read_text()
    assert "Cross-fitted" in (out / "results.md").read_text()


def test_warmup_prompts_choose_and_are_never_timed(report):
    results, out = report
    entry = results["models"]["cllm"]["set"]
    assert results["machine"]["warmup_prompts_from"]["set"].startswith("first of")
    for path in entry["records"].values():
        ids = [json.loads(line)["question_id"] for line in (out / path).read_text().splitlines()]
        assert ids == ["q2", "q3", "q4", "q5"]  # q0, q1 were the warm-ups
    assert set(entry["choice"]["jacobi"]) == {"jacobi n=2 float64", "jacobi n=4 float64"}
    chosen = entry["decoders"]["jacobi"]["setting"]
    table = entry["choice"]["jacobi"]
    assert table[chosen]["median_tokens_per_s"] == max(row["median_tokens_per_s"] for row in table.values())


def test_records_are_spec_bench_answer_files(report):
    results, out = report
    entry = results["models"]["cllm"]["set"]
    line = json.loads((out / entry["records"]["recycle"]).read_text().splitlines()[0])
    assert line["category"] == "set" and line["model_id"].startswith("tiny:recycle n=")
    choice = line["choices"][0]
    assert set(choice) >= {"turns", "new_tokens", "wall_time", "accept_lengths"}
    assert choice["new_tokens"] == [sum(choice["accept_lengths"])]
    assert json.loads((out / entry["records"]["ar"]).read_text().splitlines()[0])["model_id"] == "tiny:ar eager float64"


def spec_bench_speedup(method_file: Path, base_file: Path, tokenizer, task: str) -> tuple[float, float]:
    """Spec-Bench's evaluation/speed.py `speed()`, reimplemented from its description for this test."""

    def load(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [row for row in rows if task == "overall" or row["category"] == task]

    speeds, accepted = [], []
    for row in load(method_file):
        choice = row["choices"][0]
        speeds.append(sum(choice["new_tokens"]) / sum(choice["wall_time"]))
        accepted.extend(choice["accept_lengths"])
    base = []
    for row in load(base_file):
        tokens = sum(len(tokenizer(turn).input_ids) - 1 for turn in row["choices"][0]["turns"])
        base.append(tokens / sum(row["choices"][0]["wall_time"]))
    return statistics.fmean(speeds) / statistics.fmean(base), statistics.fmean(accepted)


@pytest.mark.parametrize("source", ["live", "fixture"])
def test_spec_bench_arithmetic_on_the_records_matches_the_report(report, source):
    results, out = report
    if source == "fixture":  # a committed report: the figures must not drift with the code that reads them
        out = FIXTURE
        results = json.loads((FIXTURE / "results.json").read_text())
    tokenizer = build_tiny_tokenizer()
    for suite, entry in results["models"]["cllm"].items():
        if suite == "spec":
            continue
        for decoder, figures in entry["decoders"].items():
            speedup, mean_accepted = spec_bench_speedup(
                out / entry["records"][decoder], out / entry["records"]["ar"], tokenizer, suite
            )
            assert speedup == pytest.approx(figures["speedup_vs_ar"]["spec_bench"], rel=1e-12)
            assert mean_accepted == pytest.approx(figures["tokens_per_step_pooled"], rel=1e-12)


def test_timed_budget_decodes_the_rest_untimed(tmp_path):
    settings = EvaluateSettings(
        model="tiny",
        prompts=[str(prompt_file(tmp_path, 5))],
        n=4,
        max_new_tokens=6,
        dtypes=["float64"],
        compile=False,
        decoder=["jacobi"],
        repeats=1,
        warmup=1,
        timed=2,
        output=str(tmp_path / "out"),
    )
    entry = evaluate(settings)["models"]["cllm"]["set"]
    assert entry["timed_prompts"] == 2 and entry["untimed_prompts"] == 2 and entry["n_prompts"] == 4
    assert entry["decoders"]["jacobi"]["speedup_vs_ar"]["n_prompts"] == 2
    lines = (tmp_path / "out" / entry["records"]["jacobi"]).read_text().splitlines()
    assert len(lines) == 4  # every prompt has its record; only the first 2 count for speed


def test_choose_excludes_a_compiled_ar_that_disagrees_with_eager_and_records_failures():
    def fixed(tokens):
        return lambda prompt: (tokens, [1] * len(tokens))

    def broken(prompt):
        raise RuntimeError("no C++ compiler")

    candidates = [
        Candidate("ar eager float32", "ar", 1, "float32", fixed([1, 2, 3])),
        Candidate("ar compiled float32", "ar", 1, "float32", fixed([9, 9, 9])),  # fastest, but wrong
        Candidate("ar compiled bfloat16", "ar", 1, "bfloat16", broken),
    ]
    best, table = choose(candidates, [[5], [6]])
    assert best.label == "ar eager float32"
    assert table["ar compiled float32"]["excluded"] and table["ar compiled float32"]["agreement_with_eager"] == 0.0
    assert table["ar compiled bfloat16"]["failed"].startswith("RuntimeError: no C++ compiler")


def test_the_fastest_runner_is_chosen_in_one_paired_round_not_across_rounds(monkeypatch):
    """A runner slow in its own warm-up round (a compile still settling, a busy stretch) but faster than its rival
    once both are timed side by side is the one chosen: separate rounds are not compared. A fake clock: exact."""
    clock = [0.0]
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = [0]

    def settling(prompt):  # 3 s a prompt on its first three calls, then 1 s
        calls[0] += 1
        clock[0] += 3.0 if calls[0] <= 3 else 1.0
        return [1, 2], [2]

    def steady(prompt):  # 2 s a prompt
        clock[0] += 2.0
        return [1, 2], [2]

    a = Candidate("recycle n=16 float32", "recycle", 16, "float32", settling)
    b = Candidate("recycle+compile n=16 float32", "recycle+compile", 16, "float32", steady)
    warm = [[5], [6]]
    (won_a, table_a), (won_b, table_b) = choose([a], warm), choose([b], warm)
    assert table_a[a.label]["median_tokens_per_s"] == pytest.approx(2 / 3)  # its own round: a looks slower
    assert table_b[b.label]["median_tokens_per_s"] == pytest.approx(1.0)
    best, table = choose_fastest([won_a, won_b], warm, repeats=2)
    assert best is a and table == {a.label: pytest.approx(2.0), b.label: pytest.approx(1.0)}


def test_sampled_evaluation_times_hf_sampling_against_sampled_jacobi(tmp_path):
    """--temperature > 0: AR is HF sampling at the same settings (no compiled candidate: it is greedy only), every
    repeat of a prompt draws the same tokens (seeded per call), and the records hold the sampled texts."""
    settings = EvaluateSettings(
        model="tiny",
        prompts=[str(prompt_file(tmp_path, 4))],
        n=4,
        max_new_tokens=8,
        dtypes=["float64"],
        decoder=["jacobi"],
        repeats=2,
        warmup=1,
        temperature=0.8,
        top_k=20,
        seed=3,
        output=str(tmp_path / "out"),
    )
    results = evaluate(settings)
    entry = results["models"]["cllm"]["set"]
    assert results["decoding"] == "T=0.8 top_k=20 top_p=1 seed=3"
    assert entry["ar"]["variant"] == "ar sampled float64" and set(entry["choice"]["ar"]) == {"ar sampled float64"}
    line = json.loads((tmp_path / "out" / entry["records"]["jacobi"]).read_text().splitlines()[0])
    assert line["choices"][0]["turns"][0] and line["model_id"].endswith("jacobi n=4 float64")


def test_sampling_with_a_decoder_that_cannot_sample_is_one_line(tmp_path):
    from cllm.errors import UserError

    settings = EvaluateSettings(
        model="tiny", prompts=[str(prompt_file(tmp_path, 3))], decoder=["recycle"], temperature=1
    )
    with pytest.raises(UserError, match="--decoder recycle with --temperature > 0"):
        evaluate(settings)


def test_the_cross_fitted_gain_recomputed_from_the_records_equals_the_engines(report, tmp_path):
    """benchmarks/cross_fitted_gain.py (for reports older than the figure) reads the same timings back."""
    import shutil

    from test_hw_benchmarks import BENCHMARKS, load

    results, out = report
    copy = tmp_path / "report"
    shutil.copytree(out, copy)
    stripped = json.loads((copy / "results.json").read_text())
    stripped["training_gain"]["set"].pop("cross_fitted")
    (copy / "results.json").write_text(json.dumps(stripped))
    load(BENCHMARKS / "cross_fitted_gain.py").main(["--reports", str(copy)])
    again = json.loads((copy / "results.json").read_text())["training_gain"]["set"]["cross_fitted"]
    assert again == results["training_gain"]["set"]["cross_fitted"]
    assert "Cross-fitted" in (copy / "results.md").read_text()


def test_warmup_choice_cost_against_a_hand_count():
    """benchmarks/warmup_choice.py: a (median 5.5) beats b (2) over all prompts; of the 6 pairs of prompts only
    {0, 1} (a's median 1) chooses b, costing 1 - 2 / 5.5; random draws approach 1/6 and 1/6 of that cost."""
    from test_hw_benchmarks import BENCHMARKS, load

    wrong, cost = load(BENCHMARKS / "warmup_choice.py").choice_cost({"a": [1, 1, 10, 10], "b": [2, 2, 2, 2]}, 2)
    assert wrong == pytest.approx(1 / 6, abs=0.03) and cost == pytest.approx((1 - 2 / 5.5) / 6, abs=0.02)
    assert load(BENCHMARKS / "warmup_choice.py").choice_cost({"a": [3, 3], "b": [1, 1]}, 2) == (0.0, 0.0)


def test_tokens_per_step_without_degenerate_outputs_drops_the_loops():
    loop, plain, short = [7] * 12, list(range(12)), [1, 2, 3, 4]
    timing = Timings(tokens=[loop, plain, short], passes=[[12], [3] * 4, [1, 1, 2]])  # 12, 3 and 4/3 tokens/pass
    assert timing.tokens_per_step == pytest.approx((12 + 3 + 4 / 3) / 3)
    assert tokens_per_step_non_degenerate(timing) == pytest.approx((3 + 4 / 3) / 2)
    assert tokens_per_step_non_degenerate(Timings(tokens=[loop], passes=[[12]])) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"temperature": 1}, "--decoder recycle\\+compile with --temperature > 0: the compiled fast path is greedy"),
        ({"candidates": 0}, "--decoder recycle\\+compile verifies pool n-grams: --candidates must be >= 1"),
    ],
)
def test_compiled_recycle_refuses_what_it_cannot_do_in_one_line(tmp_path, overrides, message):
    from cllm.errors import UserError

    settings = EvaluateSettings(
        model="tiny", prompts=[str(prompt_file(tmp_path, 3))], decoder=["recycle+compile"], **overrides
    )
    with pytest.raises(UserError, match=message):
        evaluate(settings)
    assert not list(tmp_path.glob("out*"))

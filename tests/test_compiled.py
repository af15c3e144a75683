"""The fast path (static cache, compiled step) equals eager greedy AR, Jacobi and recycling (float64, tiny models)."""

import pytest
from test_jacobi import MAX_NEW_TOKENS, hf_greedy, random_prompts

from cllm.compiled import static_greedy_ar, static_jacobi_generate, static_recycle_generate
from cllm.decoders import DECODERS
from cllm.jacobi import DecodeOptions, jacobi_generate


@pytest.mark.parametrize("lengths", [(7,), (5, 12, 3, 9)], ids=["batch1", "batch4"])
def test_static_ar_equals_greedy_ar(tiny_float64, lengths):
    model, _ = tiny_float64
    prompts = random_prompts(lengths, seed=2)
    tokens = static_greedy_ar(model, prompts, max_new_tokens=MAX_NEW_TOKENS, compile=False)
    assert tokens == [hf_greedy(model, p, MAX_NEW_TOKENS) for p in prompts]


@pytest.mark.parametrize("n", [2, 4, 16])
@pytest.mark.parametrize("lengths", [(7,), (5, 12, 3, 9)], ids=["batch1", "batch4"])
def test_static_jacobi_is_jacobi_pass_for_pass(tiny_float64, n, lengths):
    model, _ = tiny_float64
    prompts = random_prompts(lengths, seed=6)
    options = DecodeOptions(n=n, max_new_tokens=MAX_NEW_TOKENS, seed=1)
    ours = static_jacobi_generate(model, prompts, options, compile=False)
    reference = jacobi_generate(model, prompts, options)
    assert ours.tokens == reference.tokens
    assert ours.accepted_per_pass == reference.accepted_per_pass


def test_static_paths_stop_at_eos_per_row(tiny_float64):
    model, _ = tiny_float64
    prompts = random_prompts((6, 11, 4), seed=5)
    eos = hf_greedy(model, prompts[1], MAX_NEW_TOKENS)[9]
    expected = [hf_greedy(model, p, MAX_NEW_TOKENS, eos=eos) for p in prompts]
    assert static_greedy_ar(model, prompts, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos, compile=False) == expected
    options = DecodeOptions(n=4, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    result = static_jacobi_generate(model, prompts, options, compile=False)
    assert result.tokens == expected
    with pytest.raises(ValueError, match="lockstep"):  # one process only: no all_done hook
        static_jacobi_generate(model, prompts, DecodeOptions(all_done=lambda done: done), compile=False)


@pytest.mark.slow
def test_compiled_equals_eager(tiny_float64):
    model, _ = tiny_float64
    prompts = random_prompts((5, 9), seed=3)
    expected = [hf_greedy(model, p, 20) for p in prompts]
    for _ in range(2):  # the second call reuses the compiled graph with a fresh cache
        assert static_greedy_ar(model, prompts, max_new_tokens=20, compile=True) == expected
        options = DecodeOptions(n=4, max_new_tokens=20)
        compiled = static_jacobi_generate(model, prompts, options, compile=True)
        eager = jacobi_generate(model, prompts, options)
        assert compiled.tokens == expected
        assert compiled.accepted_per_pass == eager.accepted_per_pass
        kwargs = dict(candidates=2, ngrams=planted(model, prompts, 4))
        compiled = static_recycle_generate(model, prompts, options, compile=True, **kwargs)
        eager = DECODERS["recycle"](model, prompts, options, **kwargs)
        assert compiled.tokens == expected
        assert compiled.accepted_per_pass == eager.accepted_per_pass
        assert compiled.recycled_passes == eager.recycled_passes and sum(eager.recycled_passes) > 0


def test_evaluate_compiled_ar_candidate_is_static_ar(tiny_float64, monkeypatch):
    """`cllm evaluate --compile`'s compiled AR candidate goes through `compiled_ar` and returns greedy AR's tokens."""
    import torch

    from cllm.runners import ar_candidates

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)  # the graph itself is test_compiled_equals_eager's
    model, _ = tiny_float64
    prompts = random_prompts((5, 9), seed=4)
    kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "eos": None, "pad_token_id": 0, "max_len": 9 + MAX_NEW_TOKENS}
    candidates = {c.label: c for c in ar_candidates({"float64": model}, compile=True, **kwargs)}
    assert set(candidates) == {"ar eager float64", "ar compiled float64"}
    for prompt in prompts:
        tokens, passes = candidates["ar compiled float64"].run(prompt)
        assert tokens == hf_greedy(model, prompt, MAX_NEW_TOKENS) and passes == [1] * len(tokens)


def planted(model, prompts, n):
    """Each prompt's greedy continuation cut into n-grams: recycled candidates that win whole passes."""
    grams = []
    for prompt in prompts:
        continuation = hf_greedy(model, prompt, MAX_NEW_TOKENS)
        grams += [continuation[i : i + n] for i in range(0, len(continuation) - n + 1, 3)]
    return grams


@pytest.mark.parametrize(("n", "ngram", "candidates"), [(4, None, 2), (8, 3, 1), (2, 6, 3)])
@pytest.mark.parametrize("lengths", [(7,), (5, 12, 3, 9)], ids=["batch1", "batch4"])
def test_static_recycle_is_recycle_pass_for_pass(tiny_float64, n, ngram, candidates, lengths):
    """Same tokens (greedy AR's), passes and recycled passes as the eager `recycle`, recycled winners included."""
    model, _ = tiny_float64
    prompts = random_prompts(lengths, seed=6)
    options = DecodeOptions(n=n, max_new_tokens=MAX_NEW_TOKENS, seed=1)
    kwargs = dict(candidates=candidates, ngram=ngram, ngrams=planted(model, prompts, ngram or n)[::2])
    ours = static_recycle_generate(model, prompts, options, compile=False, **kwargs)
    reference = DECODERS["recycle"](model, prompts, options, **kwargs)
    assert ours.tokens == [hf_greedy(model, p, MAX_NEW_TOKENS) for p in prompts]
    assert ours.tokens == reference.tokens
    assert ours.accepted_per_pass == reference.accepted_per_pass
    assert ours.recycled_passes == reference.recycled_passes
    assert sum(ours.recycled_passes) > 0  # the slot move after a recycled win was exercised


def test_static_recycle_stops_at_eos_per_row_and_refuses_lockstep(tiny_float64):
    model, _ = tiny_float64
    prompts = random_prompts((6, 11, 4), seed=5)
    eos = hf_greedy(model, prompts[1], MAX_NEW_TOKENS)[9]
    expected = [hf_greedy(model, p, MAX_NEW_TOKENS, eos=eos) for p in prompts]
    options = DecodeOptions(n=4, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
    assert static_recycle_generate(model, prompts, options, compile=False).tokens == expected
    with pytest.raises(ValueError, match="lockstep"):
        static_recycle_generate(model, prompts, DecodeOptions(all_done=lambda done: done), compile=False)


def test_evaluate_compiled_recycle_candidate_is_static_recycle(tiny_float64, monkeypatch):
    """`cllm evaluate --decoder recycle+compile` runs `static_recycle_generate` with the recycle settings given."""
    import torch

    import cllm.runners as runners

    monkeypatch.setattr(torch, "compile", lambda fn, **_: fn)
    calls = []
    real = runners.static_recycle_generate
    monkeypatch.setattr(runners, "static_recycle_generate", lambda *a, **k: calls.append(k) or real(*a, **k))
    model, _ = tiny_float64
    options = DecodeOptions(max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
    decoder_options = {"blocks": 2, "threshold": 0.5, "candidates": 3, "pool_size": 4, "ngram": 5}
    (candidate,) = runners.decoder_candidates({"float64": model}, "recycle+compile", [4], options, decoder_options, 64)
    assert candidate.label == "recycle+compile n=4 float64" and candidate.width == 4 + 3 * 5
    (prompt,) = random_prompts((7,), seed=4)
    tokens, passes = candidate.run(prompt)
    assert tokens == hf_greedy(model, prompt, MAX_NEW_TOKENS) and sum(passes) == len(tokens)
    assert calls == [{"max_len": 64 + 19, "candidates": 3, "pool_size": 4, "ngram": 5}]

"""Every decoder equals Hugging Face greedy `generate` token for token (float64, random tiny models)."""

import pytest
import torch
from test_jacobi import MAX_NEW_TOKENS, hf_greedy, random_prompts

from cllm.decoders import DECODERS, decode_batched, multiblock_generate
from cllm.jacobi import DecodeOptions, jacobi_generate
from cllm.models import load_model
from cllm.ngram_pool import NGramPool
from cllm.segments import pack_segments

# each decoder's own settings, beyond DecodeOptions
OWN = {"jacobi": {}, "multiblock": {"blocks": 3, "threshold": 0.25}, "recycle": {"candidates": 3}}
OWN["multiblock+recycle"] = {**OWN["multiblock"], **OWN["recycle"]}
_REFERENCES: dict = {}


def reference(model, prompt, max_new_tokens, eos=None):
    """HF greedy output, computed once per (model, prompt, budget, eos) across the parametrized cases."""
    key = (id(model), tuple(prompt), max_new_tokens, eos)
    if key not in _REFERENCES:
        _REFERENCES[key] = hf_greedy(model, prompt, max_new_tokens, eos=eos)
    return _REFERENCES[key]


@pytest.fixture(scope="module", params=[0, 1, 2])
def seeded_model(request):
    model, _ = load_model(f"tiny:seed={request.param}", dtype="float64")
    return model, request.param


def check_statistics(result, lengths, n_most):
    for row, tokens in enumerate(result.tokens):
        assert sum(result.accepted_per_pass[row]) == len(tokens) == lengths[row]
        assert all(1 <= a <= n_most for a in result.accepted_per_pass[row])
        assert result.accepted_tokens_per_step[row] == len(tokens) / result.forward_passes[row]


@pytest.mark.parametrize("decoder", list(DECODERS)[1:])  # `jacobi` itself: tests/test_jacobi.py
@pytest.mark.parametrize("n", [2, 4, 16])
@pytest.mark.parametrize("lengths", [(7,), (5, 12, 3, 9)], ids=["batch1", "batch4"])
def test_every_decoder_equals_greedy_ar(seeded_model, decoder, n, lengths):
    model, seed = seeded_model
    prompts = random_prompts(lengths, seed)
    options = DecodeOptions(n=n, max_new_tokens=MAX_NEW_TOKENS, seed=seed)
    result = DECODERS[decoder](model, prompts, options, **OWN[decoder])
    assert result.tokens == [reference(model, prompt, MAX_NEW_TOKENS) for prompt in prompts]
    blocks = OWN[decoder].get("blocks", 1)
    check_statistics(result, [MAX_NEW_TOKENS] * len(prompts), n * blocks)


@pytest.mark.parametrize("blocks", [1, 2, 3])
@pytest.mark.parametrize("candidates", [0, 2])
def test_blocks_and_candidates_with_eos_inside_a_block(tiny_float64, blocks, candidates):
    model, _ = tiny_float64
    prompts = random_prompts((6, 11, 4), seed=5)
    eos = reference(model, prompts[1], MAX_NEW_TOKENS)[9]  # row 1 emits it mid-way; others elsewhere or never
    expected = [reference(model, p, MAX_NEW_TOKENS, eos=eos) for p in prompts]
    assert len({len(e) for e in expected}) > 1, "rows should finish at different times"
    for n in (4, 16):
        options = DecodeOptions(n=n, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos)
        result = multiblock_generate(model, prompts, options, blocks=blocks, threshold=0.0, candidates=candidates)
        assert result.tokens == expected
        check_statistics(result, [len(e) for e in expected], n * blocks)
        if blocks > 1:  # r = 0: the window grows to K blocks after the first pass
            assert max(max(k) for k in result.window_blocks) == blocks


@pytest.mark.parametrize("init", ["context", "repeat", "pad"])
def test_one_block_without_candidates_is_jacobi_pass_for_pass(tiny_float64, init):
    model, _ = tiny_float64
    prompts = random_prompts((8, 3, 5), seed=4)
    options = DecodeOptions(n=4, max_new_tokens=23, init=init, seed=3)
    ours = multiblock_generate(model, prompts, options, blocks=1, candidates=0)
    reference = jacobi_generate(model, prompts, options)
    assert ours.tokens == reference.tokens
    assert ours.accepted_per_pass == reference.accepted_per_pass


@pytest.mark.parametrize("decoder", ["recycle", "multiblock+recycle"])
def test_a_planted_perfect_ngram_is_accepted_whole(tiny_float64, decoder):
    model, _ = tiny_float64
    (prompt,) = random_prompts((5,), seed=3)
    n = 8
    continuation = hf_greedy(model, prompt, 2 * n)
    options = DecodeOptions(n=n, max_new_tokens=2 * n, init="pad")
    result = DECODERS[decoder](model, [prompt], options, ngrams=[continuation[:n]], candidates=1)
    assert result.tokens[0] == continuation
    assert result.accepted_per_pass[0][0] == n  # the whole n-gram in the first pass
    assert result.recycled_passes[0] >= 1


def test_repeated_text_is_recycled_from_the_prompt(tiny_float64):
    """A prompt that is the model's own greedy output: its n-grams predict the continuation's repeats."""
    model, _ = tiny_float64
    (seed_prompt,) = random_prompts((4,), seed=7)
    text = seed_prompt + hf_greedy(model, seed_prompt, 40)
    prompt, target = text[:30], text[30:]
    options = DecodeOptions(n=4, max_new_tokens=10)
    plain = DECODERS["jacobi"](model, [prompt], options)
    recycled = DECODERS["recycle"](model, [prompt], options, candidates=4)
    assert recycled.tokens == plain.tokens == [target[:10]]


def test_pool_is_bounded_and_most_recent_first():
    pool = NGramPool(length=3, per_key=2)
    pool.add_all([1, 2, 3, 1, 5, 6, 1, 7])
    assert pool.grams[1] == [(1, 5, 6), (1, 2, 3)]  # (1, 7) is too short for a full n-gram here
    pool.add([1, 9, 9])
    assert pool.grams[1] == [(1, 9, 9), (1, 5, 6)]
    assert pool.candidates(1, 5, exclude=[1, 9, 9, 4]) == [(1, 5, 6)]


def test_segments_are_causal_alone_and_see_the_cache():
    ids, positions, mask, offsets = pack_segments(
        [[[5, 6, 7], [5, 8]], [[4]]], torch.tensor([[1, 0], [1, 1]]), torch.tensor([1, 2]), pad_token_id=0
    )
    assert ids.tolist() == [[5, 6, 7, 5, 8], [4, 0, 0, 0, 0]]
    assert positions[0].tolist() == [1, 2, 3, 1, 2]
    assert offsets == [[(0, 3), (3, 2)], [(0, 1)]]
    expected_row0 = [
        [1, 0, 1, 0, 0, 0, 0],
        [1, 0, 1, 1, 0, 0, 0],
        [1, 0, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 0, 1, 0],
        [1, 0, 0, 0, 0, 1, 1],
    ]
    assert mask[0, 0].long().tolist() == expected_row0
    assert mask[1, 0, 1].long().tolist() == [1, 1, 0, 1, 0, 0, 0]  # a padding query sees the cache and itself


def test_decode_batched_gives_each_decoder_its_own_options(tiny_float64):
    model, _ = tiny_float64
    prompts = random_prompts((4, 7, 5), seed=8)
    own = {"blocks": 2, "threshold": 0.0, "candidates": 2, "pool_size": 4, "ngram": 3}
    expected = [reference(model, p, 12) for p in prompts]
    for name in DECODERS:
        merged = decode_batched(model, prompts, batch_size=2, decoder=name, decoder_options=own, n=4, max_new_tokens=12)
        assert merged.tokens == expected
    with pytest.raises(ValueError, match="unknown decoder 'lookahead'"):
        decode_batched(model, prompts, batch_size=2, decoder="lookahead", n=4)

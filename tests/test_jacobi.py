"""Jacobi decoding must equal greedy AR token for token (float64, random tiny models)."""

import pytest
import torch

from cllm.decoders import DECODERS, decode_batched
from cllm.jacobi import DecodeOptions, accepted_lengths, jacobi_generate, jacobi_step
from cllm.models import eos_ids, load_model

MAX_NEW_TOKENS = 37  # deliberately not a multiple of any block size


def random_prompts(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 259, (length,), generator=generator).tolist() for length in lengths]


def hf_greedy(model, prompt, max_new_tokens, eos=None):
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=[0, 1, 2])
def seeded_model(request):
    model, _ = load_model(f"tiny:seed={request.param}", dtype="float64")
    return model, request.param


@pytest.mark.parametrize("n", [1, 2, 4, 16])
@pytest.mark.parametrize("lengths", [(7,), (5, 12, 3, 9)], ids=["batch1", "batch4"])
def test_jacobi_equals_greedy_ar(seeded_model, n, lengths):
    model, seed = seeded_model
    prompts = random_prompts(lengths, seed)
    result = jacobi_generate(model, prompts, DecodeOptions(n=n, max_new_tokens=MAX_NEW_TOKENS, seed=seed))
    for row, prompt in enumerate(prompts):
        assert result.tokens[row] == hf_greedy(model, prompt, MAX_NEW_TOKENS)
        assert sum(result.accepted_per_pass[row]) == len(result.tokens[row]) == MAX_NEW_TOKENS
        assert all(1 <= a <= n for a in result.accepted_per_pass[row])
    if n == 1:
        assert result.accepted_tokens_per_step == [1.0] * len(prompts)


def test_eos_inside_a_block_and_rows_finishing_at_different_times(tiny_float64):
    model, _ = tiny_float64
    prompts = random_prompts((6, 11, 4), seed=5)
    reference = [hf_greedy(model, p, MAX_NEW_TOKENS) for p in prompts]
    eos = reference[1][9]  # a token row 1 emits mid-way; other rows may emit it at other places, or never
    expected = [hf_greedy(model, p, MAX_NEW_TOKENS, eos=eos) for p in prompts]
    assert len(expected[1]) <= 10 and expected[1][-1] == eos
    assert len({len(e) for e in expected}) > 1, "rows should finish at different times"
    for n in (4, 16):
        result = jacobi_generate(model, prompts, DecodeOptions(n=n, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos))
        assert result.tokens == expected
        assert [sum(a) for a in result.accepted_per_pass] == [len(e) for e in expected]


@pytest.mark.parametrize("init", ["context", "repeat", "pad"])
def test_output_does_not_depend_on_the_initial_guess(tiny_float64, init):
    model, _ = tiny_float64
    prompts = random_prompts((8, 3), seed=9)
    result = jacobi_generate(model, prompts, DecodeOptions(n=8, max_new_tokens=20, init=init))
    assert result.tokens == [hf_greedy(model, p, 20) for p in prompts]


def test_converged_block_is_accepted_whole(tiny_float64):
    """Feeding the AR continuation as the guess must accept it in one pass (the ideal CLLM)."""
    model, _ = tiny_float64
    (prompt,) = random_prompts((5,), seed=3)
    continuation = hf_greedy(model, prompt, 8)
    # Prompt = prompt + first token: the prefill then predicts continuation[1], the block's first token.
    result = jacobi_generate(model, [prompt + continuation[:1]], DecodeOptions(n=4, max_new_tokens=4, init="pad"))
    assert result.tokens[0] == continuation[1:5]


def test_accepted_lengths_formula():
    block = torch.tensor([[5, 6, 7, 8], [5, 1, 7, 8], [5, 6, 0, 8]])
    predictions = torch.tensor([[6, 7, 8, 9], [6, 7, 8, 9], [6, 7, 8, 9]])
    # a = 1 + leading run of block[i] == predictions[i-1]
    assert accepted_lengths(block, predictions).tolist() == [4, 1, 2]


def test_max_new_tokens_zero_and_empty_batch(tiny_float64):
    model, _ = tiny_float64
    assert jacobi_generate(model, [[5, 6]], DecodeOptions(n=4, max_new_tokens=0)).tokens == [[]]
    assert jacobi_generate(model, [], DecodeOptions(n=4)).tokens == []


def test_lockstep_hook_keeps_making_passes_until_all_done(tiny_float64):
    model, _ = tiny_float64
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        baseline = jacobi_generate(model, [[5, 6, 7]], DecodeOptions(n=4, max_new_tokens=6))
        decode_passes = baseline.forward_passes[0]
        calls.clear()
        flags = []

        def all_done(local_done: bool) -> bool:
            flags.append(local_done)
            return local_done and len(flags) > decode_passes + 3  # another "rank" needs 3 more passes

        result = jacobi_generate(model, [[5, 6, 7]], DecodeOptions(n=4, max_new_tokens=6, all_done=all_done))
    finally:
        handle.remove()
    assert result.tokens == baseline.tokens
    assert len(calls) == 1 + decode_passes + 3  # prefill, own passes, 3 dummy passes


def test_jacobi_step_commits_the_accepted_run_and_carries_the_rest():
    block = torch.tensor([[5, 6, 7, 8], [5, 1, 7, 8]])
    predictions = torch.tensor([[6, 7, 9, 3], [6, 7, 8, 9]])
    accepted, carried, needs_guess = jacobi_step(block, predictions)
    assert accepted.tolist() == [3, 1]
    # next block = q[a-1:] then a-1 fresh slots
    assert carried[0, :2].tolist() == [9, 3] and needs_guess[0].tolist() == [False, False, True, True]
    assert carried[1].tolist() == [6, 7, 8, 9] and not needs_guess[1].any()


def test_decode_batched_equals_one_call_per_batch_and_takes_any_decoder(tiny_float64):
    model, _ = tiny_float64
    prompts = random_prompts((6, 11, 4, 9, 3), seed=2)
    kwargs = {"n": 4, "max_new_tokens": 12}
    merged = decode_batched(model, prompts, batch_size=2, **kwargs)
    parts = [jacobi_generate(model, prompts[i : i + 2], DecodeOptions(**kwargs)) for i in range(0, 5, 2)]
    assert merged.tokens == [row for part in parts for row in part.tokens]
    assert merged.accepted_per_pass == [row for part in parts for row in part.accepted_per_pass]
    calls = []

    def counting(model, batch, options):
        calls.append(len(batch))
        return DECODERS["jacobi"](model, batch, options)

    again = decode_batched(model, prompts, batch_size=2, decoder=counting, min_batches=4, **kwargs)
    assert again.tokens == merged.tokens and calls == [2, 2, 1, 0]  # min_batches pads with empty batches
    # keyword fields replace those of `options`
    overridden = decode_batched(model, prompts, batch_size=2, options=DecodeOptions(n=16, max_new_tokens=3), n=4)
    assert overridden.n == 4 and overridden.tokens == [row[:3] for row in merged.tokens]
    with pytest.raises(ValueError, match="unknown decoder"):
        decode_batched(model, prompts, batch_size=2, decoder="nonsense", **kwargs)


@pytest.mark.parametrize(("fields", "message"), [({"n": 0}, "n must be >= 1"), ({"init": "zeros"}, "unknown init")])
def test_decode_options_refuse_impossible_settings(fields, message):
    with pytest.raises(ValueError, match=message):
        DecodeOptions(**fields)


def test_eos_ids_joins_generation_config_and_tokenizer(tiny_float64):
    """Llama-3 / Qwen2.5 style: the generation config lists two EOS ids; decoding stops at either."""
    import copy

    model, tokenizer = tiny_float64
    model = copy.deepcopy(model)
    prompts = random_prompts((6, 11), seed=5)
    reference = [hf_greedy(model, p, MAX_NEW_TOKENS) for p in prompts]
    first, second = reference[0][4], reference[1][6]
    model.generation_config.eos_token_id = [first, second]
    ids = eos_ids(model, tokenizer)
    assert ids[:2] == [first, second] and tokenizer.eos_token_id in ids and len(ids) == len(set(ids))
    result = jacobi_generate(model, prompts, DecodeOptions(n=4, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=ids))
    assert result.tokens == [hf_greedy(model, p, MAX_NEW_TOKENS, eos=ids) for p in prompts]
    assert result.tokens[0][-1] in (first, second) and len(result.tokens[0]) <= 5
    model.generation_config.eos_token_id = None
    assert eos_ids(model, tokenizer) == [tokenizer.eos_token_id]

"""Sampled decoding is exact in distribution: a chi-square test against the enumerated continuation distribution.

A random Llama with a 12-token vocabulary (float64, large init so that its distributions are peaked and depend on
the context) and 4 new tokens: every continuation's probability under the same warpers is enumerated from the model,
then thousands of sampled-Jacobi rows are drawn in batches and compared. The same test rejects wrong acceptance rules
(committed beside, so it is shown to bite) and accepts Hugging Face AR sampling (which checks the enumeration).
"""

import re
from collections import Counter

import pytest
import torch
from test_jacobi import MAX_NEW_TOKENS, hf_greedy, random_prompts
from transformers import LlamaConfig, LlamaForCausalLM

import cllm.sampled_jacobi
from cllm.decoders import DECODERS, decode_batched
from cllm.errors import UserError
from cllm.sampled_jacobi import draw
from cllm.sampling import SAMPLED_DECODERS, SamplingSettings, check_sampled_decoder, sampled_ar

VOCAB, NEW_TOKENS, SAMPLES = 12, 4, 4000  # SAMPLES rows per prompt
PROMPTS = ([5, 9, 3], [7, 4, 10, 6, 8])  # two lengths in every batch: left padding, holes, rows apart
SETTINGS = {
    "T1": SamplingSettings(temperature=1.0, seed=1),
    "T0.7": SamplingSettings(temperature=0.7, seed=2),
    "T1.3-top_k4": SamplingSettings(temperature=1.3, top_k=4, seed=3),
    "top_p0.8": SamplingSettings(temperature=1.0, top_p=0.8, seed=4),
    "T0.7-top_k6-top_p0.9": SamplingSettings(temperature=0.7, top_k=6, top_p=0.9, seed=5),
}
REDRAFT = cllm.sampled_jacobi.redraft  # the rule under test, before any test replaces it
EXACT_P = 1e-3  # an exact sampler passes at this level (fixed seeds: the outcome is deterministic)
WRONG_P = 1e-6  # a wrong rule must be rejected at least this strongly


def build_small_model():
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model.to(torch.float64).eval()


@pytest.fixture(scope="module")
def small_model():
    return build_small_model()


@torch.no_grad()
def exact_distribution(model, prompt, sampling, eos=()):
    """P(continuation) for every continuation of up to NEW_TOKENS tokens (ending early at an EOS)."""
    live, done = {(): 1.0}, {}
    for _ in range(NEW_TOKENS):
        prefixes = list(live)
        probs = sampling.probabilities(model(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1])
        grown = {}
        for prefix, row in zip(prefixes, probs.tolist()):
            for token, p in enumerate(row):
                if p > 0:
                    (done if token in eos else grown)[prefix + (token,)] = live[prefix] * p
        live = grown
    return done | live


def chi_square_p(samples, exact):
    """p-value of Pearson's goodness of fit; cells expected < 5 times are pooled into one."""
    counts, total = Counter(map(tuple, samples)), len(samples)
    if any(sequence not in exact for sequence in counts):
        return 0.0  # a continuation the model cannot produce
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [s for s in cells if exact[s] * total >= 5]
    observed = [counts[s] for s in big] + [total - sum(counts[s] for s in big)]
    expected = [exact[s] * total for s in big] + [total * (1 - sum(exact[s] for s in big))]
    if expected[-1] < 5:  # too small a pool: merge it into the smallest cell
        observed[-2:], expected[-2:] = [sum(observed[-2:])], [sum(expected[-2:])]
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(expected) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


def sampled_jacobi(model, sampling, n=3, eos=None, init="pad", decoder="jacobi", own=None):
    """SAMPLES rows of each prompt, interleaved, decoded in batches; the rows of each prompt."""
    prompts = [PROMPTS[i % 2] for i in range(2 * SAMPLES)]
    result = decode_batched(
        model, prompts, batch_size=4000, decoder=decoder, decoder_options=own, n=n, max_new_tokens=NEW_TOKENS,
        eos_token_id=eos, init=init, sampling=sampling,
    )  # fmt: skip
    return result, [result.tokens[0::2], result.tokens[1::2]]


def assert_fits(model, sampling, per_prompt, eos=(), level=EXACT_P):
    for prompt, samples in zip(PROMPTS, per_prompt):
        p = chi_square_p(samples, exact_distribution(model, prompt, sampling, eos))
        assert p > level, f"chi-square p = {p:.2e} for prompt {prompt}"


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sampled_jacobi_is_exact_in_distribution(small_model, name):
    result, per_prompt = sampled_jacobi(small_model, SETTINGS[name])
    assert_fits(small_model, SETTINGS[name], per_prompt)
    assert all(
        sum(passes) == len(tokens) == NEW_TOKENS for tokens, passes in zip(result.tokens, result.accepted_per_pass)
    )
    assert result.mean_accepted_tokens_per_step > 1.0  # drafts are accepted, not only the exact first token


@pytest.mark.parametrize("n", [1, 8])
def test_block_sizes_prompt_guesses_and_eos_inside_a_block(small_model, n):
    """n = 1 (sampled AR through the Jacobi loop) and n = 8 > budget; guesses drawn from the prompt; EOS (token 3)
    ending rows at different passes."""
    sampling = SETTINGS["T1"]
    result, per_prompt = sampled_jacobi(small_model, sampling, n=n, eos=3, init="context")
    assert len({len(tokens) for tokens in result.tokens}) == NEW_TOKENS
    assert_fits(small_model, sampling, per_prompt, eos=(3,))


@pytest.mark.parametrize(("name", "threshold"), [("T1", 0.0), ("T0.7-top_k6-top_p0.9", 0.5)])
def test_sampled_multiblock_is_exact_in_distribution(small_model, name, threshold):
    """K = 2 blocks of n = 2: the window grows (always at r = 0) and shrinks, acceptance runs into the draft block."""
    own = {"blocks": 2, "threshold": threshold}
    result, per_prompt = sampled_jacobi(small_model, SETTINGS[name], n=2, eos=3, decoder="multiblock", own=own)
    assert_fits(small_model, SETTINGS[name], per_prompt, eos=(3,))
    assert max(max(passes) for passes in result.accepted_per_pass) > 2  # a run past block 1


@pytest.mark.parametrize("name", ["T1", "T1.3-top_k4", "top_p0.8"])
def test_hugging_face_sampling_fits_the_enumeration(small_model, name):
    prompts = [PROMPTS[i % 2] for i in range(2 * SAMPLES)]
    tokens = sampled_ar(
        small_model, prompts, max_new_tokens=NEW_TOKENS, eos=[], pad_token_id=0, sampling=SETTINGS[name]
    )
    assert_fits(small_model, SETTINGS[name], [tokens[0::2], tokens[1::2]])


def kept_or_fresh(block, kept, generator, probs):
    """Predictions c_1 .. c_W: b[i] where `kept`, else a fresh draw from p_{i-1}; c_W fresh."""
    fresh = draw(probs, generator)
    kept = torch.cat([kept, torch.zeros_like(kept[:, :1])], dim=1)
    return torch.where(kept, torch.cat([block[:, 1:], block[:, :1]], dim=1), fresh)


def resample_from_p(block, draft_probs, probs, generator):
    """Wrong: the ratio test, but a rejected draft is redrawn from p instead of max(0, p - q)."""
    kept = REDRAFT(block, draft_probs, probs, generator)[:, :-1] == block[:, 1:]
    return kept_or_fresh(block, kept, generator, probs)


def keep_the_most_likely(block, draft_probs, probs, generator):
    """Wrong: a draft is kept when it is the most likely token (greedy verification of sampled drafts)."""
    return kept_or_fresh(block, block[:, 1:] == probs[:, :-1].argmax(-1), generator, probs)


def keep_what_did_not_change(block, draft_probs, probs, generator):
    """Exact, though it looks naive: fresh draws as predictions, so a draft is kept while it equals this pass's draw
    at its place: speculative sampling with a point-mass draft (kept with probability p(x), else p without x)."""
    return draw(probs, generator)


def fresh_after_the_first_rejection(block, draft_probs, probs, generator):
    """Exact: SJD as published, the drafts after the first rejected slot drawn afresh from p (not coupled)."""
    coupled = REDRAFT(block, draft_probs, probs, generator)
    first_rejected = 1 + (coupled[:, :-1] == block[:, 1:]).long().cumprod(-1).sum(-1)
    slot = torch.arange(1, block.shape[1] + 1)
    return torch.where(slot <= first_rejected[:, None], coupled, draw(probs, generator))


@pytest.mark.parametrize(
    ("rule", "exact"),
    [
        (resample_from_p, False),
        (keep_the_most_likely, False),
        (keep_what_did_not_change, True),
        (fresh_after_the_first_rejection, True),
    ],
)
def test_the_test_bites(small_model, monkeypatch, rule, exact):
    """The same test, with the acceptance rule replaced: wrong rules are rejected, exact ones are not."""
    monkeypatch.setattr(cllm.sampled_jacobi, "redraft", rule)
    sampling = SETTINGS["T1"]
    _, per_prompt = sampled_jacobi(small_model, sampling)
    p_values = [chi_square_p(s, exact_distribution(small_model, q, sampling)) for q, s in zip(PROMPTS, per_prompt)]
    if exact:
        assert min(p_values) > EXACT_P, p_values
    else:
        assert min(p_values) < WRONG_P, p_values


def test_same_seed_same_output(small_model):
    prompts = [list(PROMPTS[i % 2]) for i in range(40)]
    kwargs = {"batch_size": 16, "n": 3, "max_new_tokens": NEW_TOKENS}
    first = decode_batched(small_model, prompts, sampling=SETTINGS["T1"], **kwargs)
    again = decode_batched(small_model, prompts, sampling=SETTINGS["T1"], **kwargs)
    other = decode_batched(small_model, prompts, sampling=SamplingSettings(1.0, seed=99), **kwargs)
    assert first.tokens == again.tokens and first.accepted_per_pass == again.accepted_per_pass
    assert first.tokens != other.tokens
    assert len({tuple(t) for t in first.tokens[:16:2]}) > 1  # rows of one prompt differ: independent draws
    assert first.tokens[:16] != first.tokens[16:32]  # and so do batches (one stream across them)
    ar = [
        sampled_ar(small_model, prompts, max_new_tokens=4, eos=[], pad_token_id=0, sampling=SETTINGS["T1"])
        for _ in "ab"
    ]
    assert ar[0] == ar[1]


def test_the_sampled_ar_baseline_seeds_each_prompt_apart(small_model, monkeypatch):
    """`cllm evaluate`'s sampled AR runs one prompt per call: one seed for every call would draw the same uniforms for
    every prompt (outputs starting alike across prompts). Each prompt gets a seed of its own, the same on a repeat."""
    import cllm.runners

    seeds = []

    def spy(model, prompts, *, sampling, **kwargs):
        seeds.append(sampling.seed)
        return sampled_ar(model, prompts, sampling=sampling, **kwargs)

    monkeypatch.setattr(cllm.runners, "sampled_ar", spy)
    (candidate,) = cllm.runners.ar_candidates(
        {"float64": small_model},
        compile=False,
        sampling=SETTINGS["T1"],
        max_new_tokens=NEW_TOKENS,
        eos=[],
        pad_token_id=0,
        max_len=16,
    )
    outputs = [candidate.run(list(prompt)) for prompt in (*PROMPTS, PROMPTS[0])]
    assert seeds[0] == seeds[2] != seeds[1] and SETTINGS["T1"].seed not in seeds
    assert outputs[0] == outputs[2]
    assert SETTINGS["T1"].for_prompt([5, 9, 3]) != SamplingSettings(1.0, seed=2).for_prompt([5, 9, 3])


@pytest.mark.parametrize("lengths", [(7,), (5, 12, 3, 9)], ids=["batch1", "batch4"])
def test_temperature_zero_and_top_k_one_are_greedy(tiny_float64, lengths):
    """temperature 0 takes the greedy path of every decoder; top_k = 1 samples, from a point mass: greedy too."""
    model, _ = tiny_float64
    prompts = random_prompts(lengths, seed=4)
    expected = [hf_greedy(model, p, MAX_NEW_TOKENS) for p in prompts]
    for name in DECODERS:
        greedy = decode_batched(model, prompts, batch_size=4, decoder=name, sampling=SamplingSettings(top_k=5), n=4,
                                max_new_tokens=MAX_NEW_TOKENS)  # fmt: skip
        assert greedy.tokens == expected, name
    for name in SAMPLED_DECODERS:
        one = decode_batched(model, prompts, batch_size=4, decoder=name, sampling=SamplingSettings(1.0, top_k=1), n=4,
                             max_new_tokens=MAX_NEW_TOKENS)  # fmt: skip
        assert one.tokens == expected, name


def test_draw_follows_the_weights():
    generator = torch.Generator().manual_seed(0)
    weights = torch.tensor([[0.0, 3.0, 1.0]]).expand(4000, 3)
    counts = torch.bincount(draw(weights, generator), minlength=3)
    assert counts[0] == 0 and abs(counts[1] / 4000 - 0.75) < 0.03


@pytest.mark.parametrize("decoder", ["recycle", "multiblock+recycle"])
def test_decoders_without_an_exact_rule_are_refused(tiny_float64, decoder):
    model, _ = tiny_float64
    with pytest.raises(UserError, match=re.escape(f"--decoder {decoder} with --temperature > 0")):
        decode_batched(model, [[5, 6]], batch_size=1, decoder=decoder, sampling=SETTINGS["T0.7"])
    with pytest.raises(UserError, match="--compile with --temperature > 0"):
        check_sampled_decoder("jacobi", compile=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"temperature": -1.0}, "--temperature must be >= 0"), ({"top_k": -2}, "--top_k"), ({"top_p": 0.0}, "--top_p")],
)
def test_impossible_settings_are_refused(fields, message):
    with pytest.raises(UserError, match=message):
        SamplingSettings(**fields)


def test_generate_samples_from_the_command_line(capsys):
    from test_cli import run

    argv = [
        "generate",
        "--model",
        "tiny",
        "--dtype",
        "float32",
        "--prompt",
        "ab ab",
        "--max-new-tokens",
        "12",
        "--n",
        "4",
    ]
    outs = [run(argv + ["--temperature", "0.7", "--seed", str(seed)], capsys) for seed in (1, 1, 2)]
    assert [code for code, _, _ in outs] == [0, 0, 0]
    completions = [out.rsplit("\n[", 1)[0] for _, out, _ in outs]  # the text before the statistics line
    assert completions[0] == completions[1] and "T=0.7 top_k=0 top_p=1 seed=1" in outs[0][1]
    code, _, err = run(argv + ["--temperature", "0.7", "--decoder", "recycle"], capsys)
    assert code == 2 and "--decoder recycle with --temperature > 0" in err

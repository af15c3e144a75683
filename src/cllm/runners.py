"""What `cllm evaluate` times: greedy AR baselines and decoders as batch-1 runners, and choosing among them.

A runner decodes one prompt and returns (generated ids, tokens committed by each decode pass). The AR candidates
are Hugging Face greedy `generate` (eager) and a static cache + `torch.compile`d step (`cllm.compiled`), in every
dtype loaded; the decoder candidates are each decoder at each block size n in every dtype (`jacobi+compile` and
`recycle+compile` are `jacobi` and `recycle` on that fast path). Settings are chosen on
warm-up prompts that are then never timed (`choose`): the fastest median tokens/s wins, and a compiled AR whose
output differs from eager AR in its dtype on most warm-up prompts is excluded, not chosen. A model's fastest runner
(for the training gain) is chosen among those winners in one more paired round on the same warm-ups
(`choose_fastest`): figures from separate rounds are not comparable (a round's drift is its own).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from cllm.compiled import compiled_ar, static_jacobi_generate, static_recycle_generate
from cllm.decoders import DECODER_OPTIONS, DECODERS, decode_batched
from cllm.jacobi import DecodeOptions, left_pad
from cllm.sampling import SamplingSettings, sampled_ar
from cllm.timing import Runner, agreement, time_paired

COMPILED_JACOBI = "jacobi+compile"  # the fixed-shape Jacobi step on the static-cache fast path
COMPILED_RECYCLE = "recycle+compile"  # rejection recycling in a fixed-width pass on the same fast path
FAST_PATHS = (COMPILED_JACOBI, COMPILED_RECYCLE)  # ours (`cllm.compiled`), greedy only, not `DECODERS` entries
DECODER_NAMES = (*DECODERS, *FAST_PATHS)


@dataclass
class Candidate:
    """One way to decode: its label (what reports name), kind (`ar` or the decoder's name), n, dtype and runner."""

    label: str
    kind: str
    n: int
    dtype: str
    run: Runner
    width: int = 1  # tokens of one decode pass (nominal: the most a pass of this decoder holds)


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def greedy_ar(
    model, prompts: list[list[int]], *, max_new_tokens: int, eos: list[int], pad_token_id: int
) -> list[list[int]]:
    """Hugging Face greedy `generate` with its KV cache, one left-padded batch."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_token_id)
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or None,
        pad_token_id=pad_token_id,
        top_p=None,
        top_k=None,
        temperature=None,
    )
    return [cut_at_eos(row[ids.shape[1] :].tolist(), eos) for row in out.cpu()]


def pass_width(decoder: str, n: int, decoder_options: dict) -> int:
    """Tokens in the widest pass of `decoder`: K blocks of n (multiblock) plus G recycled n-grams (recycle)."""
    blocks = decoder_options.get("blocks", 1) if decoder.startswith("multiblock") else 1
    recycled = decoder_options.get("candidates", 0) * (decoder_options.get("ngram") or n) if "recycle" in decoder else 0
    return n * blocks + recycled


def ar_candidates(
    models: dict[str, torch.nn.Module], *, compile: bool, sampling: SamplingSettings | None = None, **kwargs
) -> list[Candidate]:
    """Eager (and with `compile`, compiled) greedy AR in every dtype of `models` (dtype name -> model); with
    `sampling`, Hugging Face's sampled `generate` at its settings, each prompt seeded with its own seed from
    `sampling.seed` (`SamplingSettings.for_prompt`: the same prompt draws the same, prompts draw independently, as the
    decoders' one stream of draws across calls does; the compiled path is greedy)."""
    eager_kwargs = {k: v for k, v in kwargs.items() if k != "max_len"}
    candidates = []
    for dtype, model in models.items():
        if sampling is not None and not sampling.greedy:

            def sampled(prompt, model=model):
                (tokens,) = sampled_ar(model, [prompt], sampling=sampling.for_prompt(prompt), **eager_kwargs)
                return tokens, [1] * len(tokens)

            candidates.append(Candidate(f"ar sampled {dtype}", "ar", 1, dtype, sampled))
            continue

        def eager(prompt, model=model):
            (tokens,) = greedy_ar(model, [prompt], **eager_kwargs)
            return tokens, [1] * len(tokens)

        candidates.append(Candidate(f"ar eager {dtype}", "ar", 1, dtype, eager))
        if compile:

            def fast(prompt, model=model):
                (tokens,) = compiled_ar(model, [prompt], **kwargs)
                return tokens, [1] * len(tokens)

            candidates.append(Candidate(f"ar compiled {dtype}", "ar", 1, dtype, fast))
    return candidates


def decoder_candidates(
    models: dict[str, torch.nn.Module],
    decoder: str,
    n_values: list[int],
    options: DecodeOptions,
    decoder_options: dict,
    max_len: int,
    sampling: SamplingSettings | None = None,
) -> list[Candidate]:
    """`decoder` at every n in `n_values`, in every dtype of `models` (sampling when `sampling` samples: every call
    starts from its seed, so a prompt decodes the same on every repeat)."""
    candidates = []
    for dtype, model in models.items():
        for n in n_values:
            opts = DecodeOptions(**{**options.__dict__, "n": n})

            width = pass_width(decoder, n, decoder_options)
            if decoder == COMPILED_JACOBI:

                def run(prompt, model=model, opts=opts):
                    result = static_jacobi_generate(model, [prompt], opts, max_len=max_len)
                    return result.tokens[0], result.accepted_per_pass[0]

            elif decoder == COMPILED_RECYCLE:
                own = {k: v for k, v in decoder_options.items() if k in DECODER_OPTIONS["recycle"]}

                def run(prompt, model=model, opts=opts, own=own, slots=max_len + width):  # room for the wider pass
                    result = static_recycle_generate(model, [prompt], opts, max_len=slots, **own)
                    return result.tokens[0], result.accepted_per_pass[0]

            else:

                def run(prompt, model=model, opts=opts):
                    result = decode_batched(
                        model,
                        [prompt],
                        batch_size=1,
                        decoder=decoder,
                        options=opts,
                        decoder_options=decoder_options,
                        sampling=sampling,
                    )
                    return result.tokens[0], result.accepted_per_pass[0]

            candidates.append(Candidate(f"{decoder} n={n} {dtype}", decoder, n, dtype, run, width))
    return candidates


def choose(candidates: list[Candidate], warmups: list[list[int]], repeats: int = 1) -> tuple[Candidate, dict]:
    """(the fastest candidate on the warm-up prompts, the table of every candidate's warm-up figures), each prompt
    timed `repeats` times per candidate, the minimum kept (as the timed prompts are).

    Each candidate decodes the first warm-up prompt once first (compilation, allocation: not speed); a compiled
    candidate that fails there is left out with its error in the table (a compiler that fails is a result, not a
    crash). A compiled AR whose outputs differ from eager AR in its dtype on more than half the warm-up prompts is
    excluded (a broken kernel is not a baseline)."""
    table, usable = {}, {}
    for candidate in candidates:
        try:
            candidate.run(warmups[0])
        except Exception as err:  # noqa: BLE001 -- reported in the table
            if "compile" not in candidate.label:
                raise
            table[candidate.label] = {"failed": f"{type(err).__name__}: {str(err).strip()[:200]}"}
            continue
        usable[candidate.label] = candidate
    timings = time_paired({label: c.run for label, c in usable.items()}, warmups, repeats)
    eager = {c.dtype: timings[label] for label, c in usable.items() if label.startswith("ar eager")}
    for label, timing in timings.items():
        row = {"median_tokens_per_s": statistics.median(timing.rates), "tokens_per_step": timing.tokens_per_step}
        if label.startswith("ar compiled") and usable[label].dtype in eager:
            row["agreement_with_eager"] = agreement(timing, eager[usable[label].dtype])
            row["excluded"] = row["agreement_with_eager"] < 0.5
        table[label] = row
    eligible = [label for label in timings if not table[label].get("excluded")]
    best = max(eligible, key=lambda label: table[label]["median_tokens_per_s"])
    return usable[best], table


def choose_fastest(chosen: list[Candidate], warmups: list[list[int]], repeats: int = 1) -> tuple[Candidate, dict]:
    """(the fastest of `chosen`, each kind's winner of `choose`, and {label: median tokens/s}): all of them timed
    paired in one round on the warm-ups, `repeats` times each, the minimum kept. Comparing the figures of separate
    `choose` rounds instead compares two stretches of time as well as two runners: on a 2-core CPU the separate rounds
    put recycle+compile 17% ahead of recycle, and timed side by side on 48 prompts the two were within 1%
    (docs/results/json-one-block-1536-320)."""
    timings = time_paired({c.label: c.run for c in chosen}, warmups, repeats)
    table = {label: statistics.median(timing.rates) for label, timing in timings.items()}
    best = max(chosen, key=lambda c: table[c.label])
    return best, table

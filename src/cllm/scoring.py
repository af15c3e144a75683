"""Scoring a model on prompt sets: acceptance, batch-1 speed against greedy AR, task quality, agreement.

The headline benchmark (`benchmarks/headline.py`) runs `evaluate_model` for the base model and the CLLM; the
accepted-tokens callback shares `common_prefix_fraction` and `has_repeated_run`; decoding goes through
`cllm.jacobi.decode_batched` and the AR baselines are `cllm.bench.greedy_ar` and, with `compile_ar`,
`cllm.compiled.compiled_ar` (static cache, compiled step), as in `cllm bench --compile`.
"""

from __future__ import annotations

import time

from cllm.bench import greedy_ar
from cllm.compiled import compiled_ar
from cllm.data_modules.json_extract import score_output
from cllm.data_modules.prompts import encode_prompts
from cllm.decoders import decode_batched
from cllm.evaluation import humaneval_pass_at_1
from cllm.hardware import OtherLoad
from cllm.jacobi import DecodeOptions
from cllm.models import eos_ids, load_model
from cllm.records import REPETITION_LIMIT, Prompt, longest_run


def common_prefix_fraction(output: list[int], reference: list[int]) -> float:
    """len(common prefix) / max(len(output), len(reference)); 1.0 for two empty outputs."""
    longest = max(len(output), len(reference))
    if longest == 0:
        return 1.0
    same = 0
    for a, b in zip(output, reference):
        if a != b:
            break
        same += 1
    return same / longest


def has_repeated_run(tokens: list[int], run: int = REPETITION_LIMIT) -> bool:
    """Whether `tokens` holds `run` identical tokens in a row (the degenerate-repetition symptom)."""
    return longest_run(tokens) >= run


def quality(set_name: str, prompts: list[Prompt], texts: list[str], unsafe_exec: bool = False) -> dict[str, float]:
    """Task quality against the ground truth: HumanEval pass@1 (sandboxed execution); json-extract valid/exact/
    field accuracy against the generating record (nothing is executed). Other sets have none.
    `unsafe_exec`: run HumanEval code without the bubblewrap sandbox where there is none."""
    if set_name == "humaneval":
        passed = humaneval_pass_at_1([p.meta for p in prompts], texts, unsafe_exec=unsafe_exec)
        return {"pass_at_1": sum(passed) / len(passed)}
    if set_name == "json-extract":
        scores = [score_output(text, p.meta["record"]) for p, text in zip(prompts, texts)]
        return {key: sum(s[key] for s in scores) / len(scores) for key in ("valid", "exact", "fields")}
    return {}


def _timed(function, *args, repeats: int = 1, **kwargs):
    """`(value, seconds)` of the fastest of `repeats` calls (timeit's rule: interference only ever adds time)."""
    best = None
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        value = function(*args, **kwargs)
        seconds = time.perf_counter() - start
        if best is None or seconds < best[1]:
            best = (value, seconds)
    return best


def speed(
    models: dict,
    tokenizer,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    n_values: list[int],
    decoders: tuple[str, ...] = ("jacobi",),
    repeats: int = 1,
    compile_ar: bool = False,
) -> dict:
    """Per prompt, batch 1: greedy AR in every dtype, eager HF `generate` and with `compile_ar` also a static cache
    + `torch.compile`d step (`cllm.compiled`; `result["ar"]["compiled DTYPE"]`); the fastest of them all is the
    baseline (`result["fastest_ar"]`). Each decoder (default options, see docs/decoding.md) runs for each n in every
    dtype too and is reported in its fastest (`by_dtype` holds them all: on an AMX CPU a 1-token pass is cheapest in
    float32 and an n-token pass in bf16); each prompt's time is the fastest of `repeats` runs; "= AR" compares with
    eager greedy AR in the decoder's own dtype. `result["decoders"][name][n]`; `result["jacobi"]` is
    `result["decoders"]["jacobi"]` when it was timed; `result["other_cpu_share"]`: the CPU share other processes
    used meanwhile (`cllm.hardware.OtherLoad`; above 0.1 the timings are not this machine's speed)."""
    with OtherLoad() as load:
        result = _speed(models, tokenizer, prompt_ids, max_new_tokens, n_values, decoders, repeats, compile_ar)
    result["other_cpu_share"] = load.share
    result["repeats"] = repeats
    return result


def _ar_entry(runs: list) -> dict:
    tokens, seconds = [len(out[0]) for out, _ in runs], [s for _, s in runs]
    return {
        "tokens_per_s": sum(tokens) / sum(seconds),
        "per_prompt_tokens_per_s": [t / s for t, s in zip(tokens, seconds)],
        "outputs": [out[0] for out, _ in runs],
    }


def _speed(models, tokenizer, prompt_ids, max_new_tokens, n_values, decoders, repeats, compile_ar=False) -> dict:
    eos, pad = eos_ids(next(iter(models.values())), tokenizer), tokenizer.pad_token_id
    timing = {"eos": eos, "pad_token_id": pad, "max_new_tokens": max_new_tokens, "repeats": repeats}
    result: dict = {"ar": {}, "decoders": {name: {} for name in decoders}}
    max_len = max(len(p) for p in prompt_ids) + max_new_tokens
    for dtype, model in models.items():
        greedy_ar(model, prompt_ids[:1], max_new_tokens=4, eos=eos, pad_token_id=pad)  # warm-up
        result["ar"][dtype] = _ar_entry([_timed(greedy_ar, model, [p], **timing) for p in prompt_ids]) | {
            "dtype": dtype
        }
        if not compile_ar:
            continue
        name, start = f"compiled {dtype}", time.perf_counter()
        try:  # the first call compiles the [1, 1] step for these max_len slots
            compiled_ar(model, prompt_ids[:1], max_new_tokens=4, eos=eos, pad_token_id=pad, max_len=max_len)
        except Exception as err:  # noqa: BLE001 -- a compiler that fails here is a result, not a crash
            result.setdefault("compile_failures", {})[name] = f"{type(err).__name__}: {str(err)[:300]}"
            continue
        compile_s = time.perf_counter() - start
        runs = [_timed(compiled_ar, model, [p], max_len=max_len, **timing) for p in prompt_ids]
        entry = _ar_entry(runs) | {"dtype": dtype, "compile_s": compile_s}
        eager = result["ar"][dtype]["outputs"]
        entry["eager_agreement"] = sum(a == b for a, b in zip(entry["outputs"], eager)) / len(runs)
        result["ar"][name] = entry
    fastest = max(result["ar"], key=lambda d: result["ar"][d]["tokens_per_s"])
    ar = result["ar"][fastest]
    for name, n in ((name, n) for name in decoders for n in n_values):
        by_dtype = {
            dtype: {"dtype": dtype}
            | _timed_decoder(model, prompt_ids, name, n, timing, result["ar"][dtype]["outputs"], ar)
            for dtype, model in models.items()
        }
        best = max(by_dtype, key=lambda d: by_dtype[d]["tokens_per_s"])
        result["decoders"][name][str(n)] = by_dtype[best] | {"by_dtype": by_dtype}
    result["fastest_ar"], result["fastest_ar_dtype"] = fastest, ar["dtype"]
    if "jacobi" in result["decoders"]:
        result["jacobi"] = result["decoders"]["jacobi"]
    for entry in result["ar"].values():
        entry.pop("outputs")
    return result


def _timed_decoder(model, prompt_ids, name: str, n: int, timing: dict, same_dtype_ar: list, fastest_ar: dict) -> dict:
    """One decoder at one n in one model's dtype: acceptance, tokens/s, speedup over the fastest AR (any dtype) and
    agreement with greedy AR in the same dtype (bf16 passes of different widths may part at near-ties)."""
    options = DecodeOptions(
        n=n, max_new_tokens=timing["max_new_tokens"], eos_token_id=timing["eos"], pad_token_id=timing["pad_token_id"]
    )
    decode_batched(model, prompt_ids[:1], batch_size=1, decoder=name, options=options, max_new_tokens=4)  # warm-up
    runs = [
        _timed(decode_batched, model, [p], batch_size=1, decoder=name, options=options, repeats=timing["repeats"])
        for p in prompt_ids
    ]
    tokens, seconds = [len(r.tokens[0]) for r, _ in runs], [s for _, s in runs]
    per_prompt = [t / s for t, s in zip(tokens, seconds)]
    return {
        "accepted_tokens_per_step": sum(r.accepted_tokens_per_step[0] for r, _ in runs) / len(runs),
        "per_prompt_accepted_tokens_per_step": [r.accepted_tokens_per_step[0] for r, _ in runs],
        "tokens_per_s": sum(tokens) / sum(seconds),
        "speedup_vs_fastest_ar": (sum(tokens) / sum(seconds)) / fastest_ar["tokens_per_s"],
        "per_prompt_speedup": [j / a for j, a in zip(per_prompt, fastest_ar["per_prompt_tokens_per_s"])],
        "ar_agreement": sum(r.tokens[0] == a for (r, _), a in zip(runs, same_dtype_ar)) / len(runs),
    }


def evaluate_model(
    spec: str,
    prompt_sets: dict[str, list[Prompt]],
    *,
    n: int,
    max_new_tokens: int,
    speed_limit: int = 0,
    n_values: list[int] | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    batch_size: int = 16,
    unsafe_exec: bool = False,
    decoders: tuple[str, ...] = ("jacobi",),
    repeats: int = 1,
    compile_ar: bool = False,
) -> dict:
    """Per prompt set: acceptance at block size `n` (one batched Jacobi run; Jacobi is lossless, so its outputs are
    the model's greedy outputs and the quality figures come from the same run), degenerate rate, quality, and with
    `speed_limit` > 0 the batch-1 speed of the first `speed_limit` prompts (`speed`: each of `decoders` at every n
    in `n_values`, the fastest of `repeats` runs per prompt; `compile_ar`: compiled greedy AR joins the baselines)."""
    models = {}
    for dtype in dtypes:
        models[dtype], tokenizer = load_model(spec, dtype=dtype)
    report = {}
    for name, prompts in prompt_sets.items():
        ids = encode_prompts(tokenizer, prompts)
        model = models[dtypes[0]]
        decoded = decode_batched(
            model,
            ids,
            batch_size=batch_size,
            n=n,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids(model, tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs = decoded.tokens
        entry = {
            "num_prompts": len(ids),
            "accepted_tokens_per_step": decoded.mean_accepted_tokens_per_step,
            "per_prompt_accepted_tokens_per_step": decoded.accepted_tokens_per_step,
            "degenerate_rate": sum(has_repeated_run(o) for o in outputs) / len(outputs),
            "outputs": outputs,
        }
        if speed_limit > 0:
            entry["speed"] = speed(
                models, tokenizer, ids[:speed_limit], max_new_tokens, n_values or [n], decoders, repeats, compile_ar
            )
        texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
        entry["quality"] = quality(name, prompts, texts, unsafe_exec)
        report[name] = entry
    return report


def compare_with_base(base: dict, cllm: dict) -> None:
    """Per set, how far the CLLM's outputs moved from the base model's: exact match and mean common-prefix share."""
    for set_name, entry in cllm.items():
        pairs = list(zip(entry["outputs"], base[set_name]["outputs"]))
        entry["exact_match_vs_base"] = sum(a == b for a, b in pairs) / len(pairs)
        entry["common_prefix_vs_base"] = sum(common_prefix_fraction(a, b) for a, b in pairs) / len(pairs)

"""`python -m cllm bench`: greedy AR vs the decoders (`--decoder`, repeatable) on the same prompts, same process.

Prints a table and writes JSON: `"jacobi"` (always run) and `"decoders": {NAME: same fields}`. The AR baseline is
the fastest variant tried (eager HF `generate` in the model's dtype and each `--ar_dtype`; with `--compile` also a
static cache + torch.compile), named in `"ar"["variant"]`. `speedup` = tokens/s over that AR's; `spec_bench_speedup`
= Spec-Bench's (mean per-sample tokens/s over AR's); `ar_agreement` = fraction of prompts whose output equals eager
AR in the model's dtype token for token (1.0 unless something is broken: the decoders are lossless, so a lower value
flags numerical ties or a bug; AR in another dtype may legitimately differ). Spec-Bench per-sample records
(`new_tokens`, `wall_time`, `accept_lengths`) go to one jsonl per decoder and one for AR (`--records`).
"""

from __future__ import annotations

import copy
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cllm.arguments import parse_settings
from cllm.compiled import compiled_ar, jacobi_slots, static_jacobi_generate
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.decoders import decode_batched
from cllm.errors import UserError
from cllm.files import write_json
from cllm.generate import DecodeSettings, load_for_decoding
from cllm.jacobi import DecodeOptions, JacobiResult, left_pad
from cllm.models import context_length, eos_ids, resolve_dtype
from cllm.speed import (
    choose_n,
    cpu_flags,
    fastest,
    format_rows,
    spec_bench_speedup,
    timed_run,
    write_spec_bench_jsonl,
)


@dataclass(kw_only=True)
class BenchSettings(DecodeSettings):
    """`cllm bench`: greedy AR vs the decoders on a prompt set.

    Args:
        prompts: a .jsonl file or a bundled set (humaneval, stdlib-code:test, ...).
        prompt_field: field holding the prompt in a .jsonl file.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per batch (every decoder).
        limit: use only the first K prompts.
        output: write the result JSON here.
        decoder: decoders to compare with AR (repeatable; jacobi always runs): jacobi | multiblock | recycle |
            multiblock+recycle.
        ar_dtype: also time greedy AR in these dtypes (the baseline is the fastest AR variant).
        records: folder of the Spec-Bench per-sample jsonl files (default: OUTPUT_STEM.records/ beside --output).
        n_candidates: `--n auto`: the block sizes to try.
        warmup_prompts: `--n auto`: prompts measured per candidate.
    """

    prompts: str
    prompt_field: str = "prompt"
    max_new_tokens: int = 128
    batch_size: int = 1
    limit: int | None = None
    output: str | None = None
    decoder: list[str] = field(default_factory=lambda: ["jacobi"])
    ar_dtype: list[str] = field(default_factory=list)
    records: str | None = None
    n_candidates: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    warmup_prompts: int = 2


def cut_at_eos(tokens: list[int], eos: list[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def greedy_ar(
    model, prompts: list[list[int]], *, max_new_tokens: int, eos: list[int], pad_token_id: int
) -> list[list[int]]:
    """The honest baseline: Hugging Face greedy `generate` with its KV cache, one left-padded batch."""
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


def timed_jacobi(model, prompts, batch_size: int, options: DecodeOptions) -> tuple[JacobiResult, float]:
    start = time.perf_counter()
    merged = decode_batched(model, prompts, batch_size=batch_size, options=options)
    return merged, time.perf_counter() - start


def ar_variants(model, dtypes: list[str], compile: bool, **kwargs) -> dict[str, Callable]:
    """The AR baselines tried: {eager HF generate, static cache + torch.compile} x dtypes (batch -> tokens, passes)."""
    variants = {}
    for name in dtypes:
        dtype = resolve_dtype(name)
        same = dtype == next(model.parameters()).dtype
        variant = model if same else copy.deepcopy(model).to(dtype)

        def eager(batch, variant=variant):
            tokens = greedy_ar(variant, batch, **{k: v for k, v in kwargs.items() if k != "max_len"})
            return tokens, [[1] * len(t) for t in tokens]

        variants[f"eager {name}"] = eager
        if compile:

            def compiled(batch, variant=variant):
                tokens = compiled_ar(variant, batch, **kwargs)
                return tokens, [[1] * len(t) for t in tokens]

            variants[f"compiled {name}"] = compiled
    return variants


def decoder_variants(
    model, names: list[str], compile: bool, options: DecodeOptions, decoder_options: dict, max_len: int
) -> dict[str, Callable]:
    """The decoders compared (batch -> tokens, passes); with `compile`, also `jacobi+compile` (the fast path)."""

    def run(name):
        def decoder(batch):
            result = decode_batched(
                model, batch, batch_size=len(batch), decoder=name, options=options, decoder_options=decoder_options
            )
            return result.tokens, result.accepted_per_pass

        return decoder

    variants = {name: run(name) for name in names}
    if compile:

        def compiled(batch):
            result = static_jacobi_generate(model, batch, options, max_len=max_len)
            return result.tokens, result.accepted_per_pass

        variants["jacobi+compile"] = compiled
    return variants


def compare(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    batch_size: int,
    init: str = "context",
    decoders: list[str] = ("jacobi",),
    decoder_options: dict | None = None,
    ar_dtypes: list[str] = (),
    compile: bool = False,
) -> dict:
    """Every AR variant and every decoder on the same prompts (after one warm-up call each); the figures.

    The AR reference for `ar_agreement` is eager AR in the model's dtype; speedups are over the fastest AR variant.
    """
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    width = max(len(p) for p in prompt_ids) + batch_size  # left padding never exceeds the longest prompt
    max_len = jacobi_slots(width, n, max_new_tokens, batch_size)
    dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
    ar_kwargs = {"max_new_tokens": max_new_tokens, "eos": eos, "pad_token_id": pad, "max_len": max_len}
    ars = ar_variants(model, [dtype_name, *[d for d in ar_dtypes if d != dtype_name]], compile, **ar_kwargs)
    options = DecodeOptions(n=n, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, init=init)
    names = ["jacobi", *[d for d in decoders if d != "jacobi"]]
    decs = decoder_variants(model, names, compile, options, decoder_options or {}, max_len)
    warmups, failed = {}, {}
    for name, decoder in {**ars, **decs}.items():  # first-call costs (and compilation) are not speed
        start = time.perf_counter()
        try:
            decoder(prompt_ids[:batch_size])
        except Exception as err:  # noqa: BLE001 -- a compiler that fails here is a result, not a crash
            if "compile" not in name:
                raise
            failed[name] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
            print(f"{name}: compilation failed, left out ({failed[name]})")
        warmups[name] = time.perf_counter() - start
    ars = {name: decoder for name, decoder in ars.items() if name not in failed}
    decs = {name: decoder for name, decoder in decs.items() if name not in failed}
    ar_runs = {name: timed_run(name, decoder, prompt_ids, batch_size) for name, decoder in ars.items()}
    runs = {name: timed_run(name, decoder, prompt_ids, batch_size) for name, decoder in decs.items()}
    reference = ar_runs[f"eager {dtype_name}"]
    best = fastest(list(ar_runs.values()))
    best_rate = sum(map(len, best.tokens)) / best.seconds
    entries = {}
    for name, run in runs.items():
        entry = run.figures(reference.tokens)
        entry["speedup"] = entry["tokens_per_s"] / best_rate
        entry["spec_bench_speedup"] = spec_bench_speedup(run, best)
        entry["warmup_seconds"] = warmups[name]
        entries[name] = entry
    variants = {}
    for name, run in ar_runs.items():
        figures = run.figures(reference.tokens)
        variants[name] = {key: figures[key] for key in ("tokens", "seconds", "tokens_per_s", "ar_agreement")}
        variants[name]["warmup_seconds"] = warmups[name]
    jacobi = runs["jacobi"]
    return {
        "ar": {**variants[best.name], "variant": best.name},
        "ar_variants": variants,
        "jacobi": {key: value for key, value in entries["jacobi"].items() if key != "speedup"},
        "decoders": entries,
        "speedup": entries["jacobi"]["speedup"],
        "per_prompt": [
            {
                "ar_tokens": len(a),
                "jacobi_tokens": len(j),
                "steps": len(p),
                "accepted_tokens_per_step": len(j) / max(len(p), 1),
                "agrees_with_ar": a == j,
            }
            for a, j, p in zip(reference.tokens, jacobi.tokens, jacobi.accepted_per_pass)
        ],
        "compile_failures": failed,
        "_runs": {"ar": best, **runs},
        "_outputs": {"ar": reference.tokens, **{name: run.tokens for name, run in runs.items()}},
    }


def format_table(result: dict) -> str:
    rows = [("decoder", "tokens", "seconds", "tokens/s", "tokens/step", "= AR", "x AR", "Spec-Bench x")]
    for name, ar in result["ar_variants"].items():
        mark = " *" if name == result["ar"]["variant"] else ""
        rows.append(
            (
                f"greedy AR {name}{mark}",
                ar["tokens"],
                f"{ar['seconds']:.2f}",
                f"{ar['tokens_per_s']:.1f}",
                "1.000",
                f"{ar['ar_agreement']:.0%}",
                "-",
                "-",
            )
        )
    for name, entry in result["decoders"].items():
        rows.append(
            (
                f"{name} n={result['n']}",
                entry["tokens"],
                f"{entry['seconds']:.2f}",
                f"{entry['tokens_per_s']:.1f}",
                f"{entry['accepted_tokens_per_step']:.3f}",
                f"{entry['ar_agreement']:.0%}",
                f"{entry['speedup']:.2f}",
                f"{entry['spec_bench_speedup']:.2f}",
            )
        )
    header = (
        f"model={result['model']} prompts={result['num_prompts']} batch={result['batch_size']} "
        f"max_new_tokens={result['max_new_tokens']} dtype={result['dtype']} device={result['device']} "
        f"cpu_flags={','.join(result['cpu_flags']) or '-'}"
    )
    footer = (
        f"speedup (Jacobi tokens/s / fastest AR tokens/s, {result['ar']['variant']}, marked *): "
        f"{result['speedup']:.2f}x; x AR = tokens/s over the fastest AR; Spec-Bench x = mean per-sample tokens/s "
        "over the fastest AR's; tokens/step = generated / decode passes"
    )
    return "\n".join([header, format_rows(rows), footer])


def bench(args: BenchSettings) -> None:
    """Run AR and every decoder on the prompt set, print the table, write the JSON and the Spec-Bench records."""
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1) or args.warmup_prompts < 1:
        raise UserError("--batch_size, --limit and --warmup_prompts must be >= 1")
    prompts = load_prompts(args.prompts, prompt_field=args.prompt_field, limit=args.limit)
    model, tokenizer = load_for_decoding(args)
    prompt_ids = encode_prompts(tokenizer, prompts, args.chat_template, context_length(model), args.prompts)
    result = {"model": args.model, "n": args.n}
    if args.n == "auto":
        args.n, result["n_auto"] = auto_n(model, tokenizer, prompt_ids[: args.warmup_prompts], args)
        result["n"] = args.n
    result.update(
        {
            "decoder_options": {**args.decoder_options(), "ngram": args.ngram or args.n},
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "num_prompts": len(prompt_ids),
            "prompts": args.prompts,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "device": args.device,
            "compile": args.compile,
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_flags": cpu_flags(),
        }
    )
    result.update(
        compare(
            model,
            tokenizer,
            prompt_ids,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            init=args.init,
            decoders=args.decoder,
            decoder_options=args.decoder_options(),
            ar_dtypes=args.ar_dtype,
            compile=args.compile,
        )
    )
    outputs, runs = result.pop("_outputs"), result.pop("_runs")
    for row, prompt in zip(result["per_prompt"], prompts):
        row["id"] = prompt.id
    print(format_table(result))
    records = Path(args.records) if args.records else Path(args.output).with_suffix(".records") if args.output else None
    if records:
        result["records"] = {}
        for name, run in runs.items():
            path = records / f"{name.replace('+', '_').replace(' ', '_')}.jsonl"
            write_spec_bench_jsonl(path, run, [p.id for p in prompts], f"{args.model}:{name}")
            result["records"][name] = str(path)
        print(f"wrote Spec-Bench records to {records}/")
    if args.output:
        result["outputs"] = outputs
        write_json(Path(args.output), result)
        print(f"wrote {args.output}")


def main(argv: list[str]) -> None:
    bench(parse_settings(BenchSettings, argv, "cllm bench", __doc__))


def auto_n(model, tokenizer, prompt_ids: list[list[int]], args) -> tuple[int, list[dict]]:
    """`--n auto`: measure TPF and pass cost of the first decoder at each candidate n on a few warm-up prompts."""
    if any(n < 1 for n in args.n_candidates):
        raise UserError(f"--n_candidates must be >= 1, got {args.n_candidates}")
    name = args.decoder[0] if args.decoder else "jacobi"
    budget = min(args.max_new_tokens, 32)
    base = DecodeOptions(
        max_new_tokens=budget,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        init=args.init,
    )
    decoder_options = args.decoder_options()

    def measure(n: int):
        options = replace(base, n=n)

        def decoder(batch):
            result = decode_batched(
                model, batch, batch_size=1, decoder=name, options=options, decoder_options=decoder_options
            )
            return result.tokens, result.accepted_per_pass

        return timed_run(name, decoder, prompt_ids, 1)

    n, table = choose_n(measure, args.n_candidates)
    rows = [("n", "tokens/step", "ms/pass", "tokens/step / s/pass")]
    rows += [
        (r["n"], f"{r['accepted_tokens_per_step']:.3f}", f"{1000 * r['seconds_per_pass']:.1f}", f"{r['score']:.1f}")
        for r in table
    ]
    print(f"--n auto ({name}, {len(prompt_ids)} warm-up prompts x {budget} tokens): n = {n}\n{format_rows(rows)}")
    return n, table

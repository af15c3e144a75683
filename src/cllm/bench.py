"""`python -m cllm bench`: greedy AR (HF `generate` with KV cache) vs Jacobi on the same prompts, same process.

Prints a table and writes JSON. `speedup` = Jacobi tokens/s over AR tokens/s; `ar_agreement` = fraction of
prompts whose Jacobi output equals the AR output token for token (1.0 unless something is broken: Jacobi is
lossless, so a lower value flags numerical ties or a bug).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from cllm.arguments import parse_settings
from cllm.data_modules.prompts import encode_prompts, load_prompts
from cllm.errors import UserError
from cllm.files import write_json
from cllm.generate import DecodeSettings, load_for_decoding
from cllm.jacobi import JacobiResult, decode_batched, left_pad
from cllm.models import context_length, eos_ids


@dataclass(kw_only=True)
class BenchSettings(DecodeSettings):
    """`cllm bench`: greedy AR vs Jacobi on a prompt set.

    Args:
        prompts: a .jsonl file or a bundled set (humaneval, stdlib-code:test, ...).
        prompt_field: field holding the prompt in a .jsonl file.
        max_new_tokens: generation budget per prompt.
        batch_size: prompts per batch (both decoders).
        limit: use only the first K prompts.
        output: write the result JSON here.
    """

    prompts: str
    prompt_field: str = "prompt"
    max_new_tokens: int = 128
    batch_size: int = 1
    limit: int | None = None
    output: str | None = None


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


def timed_ar(model, prompts, batch_size, **kwargs) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    tokens = [row for batch in batches for row in greedy_ar(model, batch, **kwargs)]
    return tokens, time.perf_counter() - start


def timed_jacobi(model, prompts, batch_size, **kwargs) -> tuple[JacobiResult, float]:
    start = time.perf_counter()
    merged = decode_batched(model, prompts, batch_size=batch_size, **kwargs)
    return merged, time.perf_counter() - start


def compare(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    n: int,
    max_new_tokens: int,
    batch_size: int,
    init: str = "context",
    decoder: str = "jacobi",
) -> dict:
    """Run AR then Jacobi on the same prompts (after one warm-up call each) and return the figures."""
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    ar_kwargs = {"max_new_tokens": max_new_tokens, "eos": eos, "pad_token_id": pad}
    jacobi_kwargs = {"n": n, "max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": pad, "init": init}
    jacobi_kwargs["decoder"] = decoder
    greedy_ar(model, prompt_ids[:1], **{**ar_kwargs, "max_new_tokens": 4})  # warm-up: first-call costs are not speed
    decode_batched(model, prompt_ids[:1], batch_size=1, **{**jacobi_kwargs, "max_new_tokens": 4})
    ar_tokens, ar_seconds = timed_ar(model, prompt_ids, batch_size, **ar_kwargs)
    jacobi, jacobi_seconds = timed_jacobi(model, prompt_ids, batch_size, **jacobi_kwargs)
    ar_count = sum(map(len, ar_tokens))
    jacobi_count = sum(map(len, jacobi.tokens))
    agree = [a == j for a, j in zip(ar_tokens, jacobi.tokens)]
    ar_rate = ar_count / ar_seconds
    jacobi_rate = jacobi_count / jacobi_seconds
    return {
        "ar": {"tokens": ar_count, "seconds": ar_seconds, "tokens_per_s": ar_rate},
        "jacobi": {
            "tokens": jacobi_count,
            "seconds": jacobi_seconds,
            "tokens_per_s": jacobi_rate,
            "steps": sum(jacobi.forward_passes),
            "accepted_tokens_per_step": jacobi.mean_accepted_tokens_per_step,
            "accepted_tokens_per_step_convention": "generated tokens / decode forward passes, per sequence, mean",
            "ar_agreement": sum(agree) / len(agree),
        },
        "speedup": jacobi_rate / ar_rate,
        "per_prompt": [
            {
                "ar_tokens": len(a),
                "jacobi_tokens": len(j),
                "steps": steps,
                "accepted_tokens_per_step": rate,
                "agrees_with_ar": same,
            }
            for a, j, steps, rate, same in zip(
                ar_tokens, jacobi.tokens, jacobi.forward_passes, jacobi.accepted_tokens_per_step, agree
            )
        ],
        "_outputs": {"ar": ar_tokens, "jacobi": jacobi.tokens},
    }


def format_table(result: dict) -> str:
    ar, jacobi = result["ar"], result["jacobi"]
    rows = [
        ("decoder", "tokens", "seconds", "tokens/s", "tokens/step", "= AR"),
        ("greedy AR", ar["tokens"], f"{ar['seconds']:.2f}", f"{ar['tokens_per_s']:.1f}", "1.000", "-"),
        (
            f"Jacobi n={result['n']}",
            jacobi["tokens"],
            f"{jacobi['seconds']:.2f}",
            f"{jacobi['tokens_per_s']:.1f}",
            f"{jacobi['accepted_tokens_per_step']:.3f}",
            f"{jacobi['ar_agreement']:.0%}",
        ),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    header = (
        f"model={result['model']} prompts={result['num_prompts']} batch={result['batch_size']} "
        f"max_new_tokens={result['max_new_tokens']} dtype={result['dtype']} device={result['device']}"
    )
    footer = (
        f"speedup (Jacobi tokens/s / AR tokens/s): {result['speedup']:.2f}x; tokens/step = generated / decode passes"
    )
    return "\n".join([header, *lines, footer])


def bench(args: BenchSettings) -> None:
    """Run AR and Jacobi on the prompt set, print the table, write the JSON."""
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--batch_size and --limit must be >= 1")
    prompts = load_prompts(args.prompts, prompt_field=args.prompt_field, limit=args.limit)
    model, tokenizer = load_for_decoding(args)
    prompt_ids = encode_prompts(tokenizer, prompts, args.chat_template, context_length(model), args.prompts)
    result = {
        "model": args.model,
        "n": args.n,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "num_prompts": len(prompt_ids),
        "prompts": args.prompts,
        "dtype": args.dtype,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    result.update(
        compare(
            model,
            tokenizer,
            prompt_ids,
            n=args.n,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            init=args.init,
        )
    )
    outputs = result.pop("_outputs")
    for row, prompt in zip(result["per_prompt"], prompts):
        row["id"] = prompt.id
    print(format_table(result))
    if args.output:
        result["outputs"] = outputs
        write_json(Path(args.output), result)
        print(f"wrote {args.output}")


def main(argv: list[str]) -> None:
    bench(parse_settings(BenchSettings, argv, "cllm bench", __doc__))

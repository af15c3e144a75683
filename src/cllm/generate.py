"""`python -m cllm generate`: Jacobi-decode one prompt, print the completion and one line of statistics."""

from __future__ import annotations

import argparse
import time

from cllm.errors import UserError


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by generate and bench: model, dtype, device, block size, chat template."""
    parser.add_argument("--model", required=True, help="smollm2-135m | path.gguf | HF folder | hub id | tiny[:k=v]")
    parser.add_argument("--n", type=int, default=16, help="Jacobi block size (tokens refined per pass)")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | float64")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:1 ...")
    parser.add_argument("--attn-implementation", default="auto", help="auto | sdpa | eager | flash_attention_2")
    parser.add_argument("--init", default="context", help="initial guess: context (official) | repeat | pad")
    parser.add_argument("--no-chat-template", dest="chat_template", action="store_false", help="encode raw text")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (unsafe)")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError, so every bad flag reads like every other bad input."""

    def error(self, message: str) -> None:
        raise UserError(message)


def make_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=description)


def load_for_decoding(args: argparse.Namespace):
    from transformers.utils import logging as hf_logging

    from cllm.models import load_model

    hf_logging.disable_progress_bar()
    if args.n < 1:
        raise UserError(f"--n must be >= 1, got {args.n}")
    return load_model(
        args.model,
        dtype=args.dtype,
        attn_implementation=args.attn_implementation,
        device=args.device,
        trust_remote_code=args.trust_remote_code,
    )


def eos_ids(model, tokenizer) -> list[int]:
    """EOS ids from the generation config (may be several) and the tokenizer."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def main(argv: list[str]) -> None:
    parser = make_parser("cllm generate", __doc__)
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)

    from cllm.data_modules.prompts import Prompt, encode_prompts
    from cllm.jacobi import jacobi_generate
    from cllm.models import context_length

    model, tokenizer = load_for_decoding(args)
    (prompt_ids,) = encode_prompts(
        tokenizer, [Prompt("prompt", args.prompt)], args.chat_template, context_length(model), "--prompt"
    )
    start = time.perf_counter()
    result = jacobi_generate(
        model,
        [prompt_ids],
        n=args.n,
        max_new_tokens=args.max_new_tokens,
        eos_token_id=eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        init=args.init,
    )
    seconds = time.perf_counter() - start
    tokens = result.tokens[0]
    print(tokenizer.decode(tokens, skip_special_tokens=True))
    print(
        f"[jacobi n={args.n}] {len(tokens)} tokens in {result.forward_passes[0]} decode passes: "
        f"{result.mean_accepted_tokens_per_step:.3f} accepted tokens/step (generated/passes, AR = 1.0), "
        f"{len(tokens) / seconds:.1f} tokens/s"
    )

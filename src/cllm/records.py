"""The dataset format, its one home: prompts in, trajectory records out, JSONL shards and the manifest.

A prompt (`Prompt`) is what a prompt source yields and a collection reads. A dataset is a folder holding
`manifest.json` and JSONL shards, one record per line and per block:

    {"prompt_id": str, "block_index": int, "prompt_ids": [int], "prefix_ids": [int],
     "states": [[int] * n, ...], "labels": [int] | null, "augmented_states": [[int] * n] (optional)}

`states` runs from the initial guess to the fixed point (the last state); the context of a block is
`prompt_ids + prefix_ids` (the fixed points of the earlier blocks). `augmented_states` are extra non-final
states made by the optional augmentation (they have no "next state"). Every reader goes through
`parse_record`, so a bad line is reported as `file:line: field 'x': what is wrong`.

The manifest (`write_dataset_manifest`, `read_manifest`) lists every shard with its record count and sha256, and
the settings of the collection (n, model and tokenizer fingerprints, ...); training checks it (`cllm.dataset_checks`).
Collection (`cllm.collection`), the importer (`cllm.official_import`) and the data module all go through here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cllm.errors import UserError
from cllm.files import atomic_write_text, count_lines, iter_lines, read_json_file, sha256_of

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{index:05d}.jsonl"
REPETITION_LIMIT = 10  # cleaning drops fixed points holding a run of this many identical tokens


@dataclass
class Prompt:
    """One prompt: a stable id, the text given to the model, an optional ground-truth answer, extra fields."""

    id: str
    text: str
    answer: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class Record:
    """One block of one prompt: every state of its full-block Jacobi iteration (last = fixed point)."""

    prompt_id: str
    block_index: int
    prompt_ids: list[int]
    prefix_ids: list[int]
    states: list[list[int]]
    labels: list[int] | None = None
    augmented_states: list[list[int]] = field(default_factory=list)

    @property
    def fixed_point(self) -> list[int]:
        return self.states[-1]

    @property
    def context(self) -> list[int]:
        return self.prompt_ids + self.prefix_ids

    def to_json(self) -> str:
        data = asdict(self)
        if not self.augmented_states:
            del data["augmented_states"]
        return json.dumps(data, separators=(",", ":"))


def _int_list(value, where: str, name: str, length: int | None = None) -> list[int]:
    # set(map(type, ...)) runs in C: this check is the hot path of streaming millions of records.
    if not isinstance(value, list) or not set(map(type, value)) <= {int}:
        raise UserError(f"{where}: field {name!r} must be a list of integers")
    if length is not None and len(value) != length:
        raise UserError(f"{where}: field {name!r} has {len(value)} tokens, expected n = {length}")
    return value


def parse_record(line: str, where: str, n: int | None = None) -> Record:
    """Parse and validate one JSONL line; `where` is `file:line` for messages; `n` checks every state's length."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
    for name in ("prompt_id", "block_index", "prompt_ids", "prefix_ids", "states"):
        if name not in data:
            raise UserError(f"{where}: field {name!r} is missing")
    if not isinstance(data["prompt_id"], str):
        raise UserError(f"{where}: field 'prompt_id' must be a string")
    if not isinstance(data["block_index"], int) or data["block_index"] < 0:
        raise UserError(f"{where}: field 'block_index' must be a non-negative integer")
    states = data["states"]
    if not isinstance(states, list) or not states:
        raise UserError(f"{where}: field 'states' must be a non-empty list of token lists")
    width = n if n is not None else (len(states[0]) if isinstance(states[0], list) else None)
    states = [_int_list(state, where, f"states[{i}]", width) for i, state in enumerate(states)]
    augmented = [
        _int_list(state, where, f"augmented_states[{i}]", width)
        for i, state in enumerate(_list_or_empty(data.get("augmented_states"), where, "augmented_states"))
    ]
    labels = data.get("labels")
    return Record(
        prompt_id=data["prompt_id"],
        block_index=data["block_index"],
        prompt_ids=_int_list(data["prompt_ids"], where, "prompt_ids"),
        prefix_ids=_int_list(data["prefix_ids"], where, "prefix_ids"),
        states=states,
        labels=None if labels is None else _int_list(labels, where, "labels"),
        augmented_states=augmented,
    )


def _list_or_empty(value, where: str, name: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: field {name!r} must be a list")
    return value


def read_records(path: Path, n: int | None = None) -> Iterator[Record]:
    """Stream the validated records of one shard."""
    for number, line in iter_lines(path):
        yield parse_record(line, f"{path}:{number}", n)


def write_shard(path: Path, records: Iterable[Record]) -> int:
    """Write records as one JSONL shard atomically; returns the record count."""
    lines = [record.to_json() for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def shard_entry(folder: Path, path: Path) -> dict:
    """Manifest entry of one shard: relative file name, record count and sha256."""
    return {"file": str(path.relative_to(folder)), "records": count_lines(path), "sha256": sha256_of(path)}


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write `manifest.json` (format version first) atomically; returns its path."""
    manifest = {"format_version": FORMAT_VERSION, **manifest}
    path = folder / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def write_dataset_manifest(folder: Path, settings: dict, extra: dict | None = None) -> dict:
    """List every shard with its record count and sha256; sum the per-shard statistics (rank 0, at the end).

    `settings` are the collection's (n, model, fingerprints, ...); `extra` adds fields, and its `stats` replace
    the summed ones (an import knows its prompt count without per-shard meta files).
    """
    shards, stats = [], {"prompts": 0, "records": 0, "dropped_repetitive": 0, "generated_tokens": 0}
    for path in sorted(Path(folder).glob("shard-*.jsonl")):
        shards.append(shard_entry(folder, path))
        meta_path = path.with_suffix(".meta.json")
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            stats["prompts"] += meta["prompts"][1] - meta["prompts"][0]
            stats["dropped_repetitive"] += meta.get("dropped_repetitive", 0)
            stats["generated_tokens"] += meta.get("tokens", 0)
        stats["records"] += shards[-1]["records"]
    extra = dict(extra or {})
    stats.update(extra.pop("stats", {}))
    manifest = {**settings, **extra, "shards": shards, "stats": stats}
    write_manifest(Path(folder), manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """Read and check `manifest.json` of a dataset folder (format version, n, shard list)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{path} not found: not a trajectory dataset (collect one with `cllm trajectories`)")
    manifest = read_json_file(path)
    for key in ("format_version", "n", "tokenizer_fingerprint", "shards"):
        if key not in manifest:
            raise UserError(f"{path}: field {key!r} is missing")
    if manifest["format_version"] != FORMAT_VERSION:
        version = manifest["format_version"]
        raise UserError(f"{path}: format_version {version} is not supported (expected {FORMAT_VERSION})")
    for i, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not {"file", "records"} <= set(shard):
            raise UserError(f"{path}: field 'shards[{i}]' needs 'file' and 'records'")
        if not (Path(folder) / shard["file"]).is_file():
            raise UserError(f"{path}: field 'shards[{i}]': shard file {shard['file']} is missing")
    return manifest


CHECKSUM_CACHE = ".checksums.json"  # per shard: size, mtime_ns and the sha256 they were hashed to


def verify_checksums(folder: str | Path, manifest: dict) -> None:
    """Compare every shard with its sha256 in the manifest; a shard whose size and mtime match the last verified
    ones (cached in `.checksums.json` beside it) is not read again, so a restart costs a stat per shard."""
    folder = Path(folder)
    cache_path = folder / CHECKSUM_CACHE
    try:
        cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    except (OSError, ValueError):
        cache = {}
    verified = {}
    for i, shard in enumerate(manifest["shards"]):
        expected = shard.get("sha256")
        if not expected:  # a hand-written manifest may list none: nothing to compare
            continue
        path = folder / shard["file"]
        stat = path.stat()
        key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}
        if cache.get(shard["file"]) != key:
            actual = sha256_of(path)
            if actual != expected:
                raise UserError(
                    f"{folder / MANIFEST_NAME}: shards[{i}] {shard['file']}: checksum {actual[:16]}... does not "
                    f"match the manifest ({expected[:16]}...); the shard changed after collection: collect it again"
                )
        verified[shard["file"]] = key
    if verified != cache:
        try:  # a read-only dataset folder only costs the next run another read
            atomic_write_text(cache_path, json.dumps(verified) + "\n")
        except OSError:
            pass


def block_size(folder: str | Path, configured: int | None) -> tuple[int, str]:
    """The block size n of a dataset and where it comes from: its manifest's when the folder holds one (a
    configured n must agree), else the configured one. One owner: `cllm fit` links it into the module and callback."""
    path = Path(folder) / MANIFEST_NAME
    if path.is_file():
        n = read_manifest(folder)["n"]
        if configured is not None and configured != n:
            raise UserError(
                f"{path}: the dataset has block size n={n}, the data module n={configured}; "
                f"set data.init_args.n: {n} (or drop it: the manifest's n is used)"
            )
        return n, str(path)
    if configured is None:
        raise UserError(f"data.init_args.n is not set and {folder} holds no dataset ({MANIFEST_NAME}) to read it from")
    return configured, "data.init_args.n"


def longest_run(tokens: list[int]) -> int:
    """Length of the longest run of one repeated token (cleaning drops fixed points with runs >= 10)."""
    best = run = 0
    previous = None
    for token in tokens:
        run = run + 1 if token == previous else 1
        previous = token
        best = max(best, run)
    return best

"""What training checks a dataset against before it reads a record: the tokenizer, the collection settings, the
model's weights, and every token id (the dataset format itself lives in `cllm.records`)."""

from __future__ import annotations

from pathlib import Path

from cllm.errors import UserError
from cllm.records import MANIFEST_NAME, Record


def check_tokenizer(manifest: dict, fingerprint: str, folder: str | Path, model: str) -> None:
    """Training refuses data made with another tokenizer: token ids would mean different things."""
    if manifest["tokenizer_fingerprint"] != fingerprint:
        raise UserError(
            f"{Path(folder) / MANIFEST_NAME}: tokenizer fingerprint {manifest['tokenizer_fingerprint']} "
            f"(model {manifest.get('model', '?')!r}) differs from the tokenizer of model {model!r} ({fingerprint}); "
            "collect the trajectories again with this model or train the model they were collected with"
        )


def check_collection_settings(manifest: dict, asked: dict, folder: str | Path) -> None:
    """Refuse a dataset collected with other settings than the config asks (a value the manifest lacks passes)."""
    for key, value in asked.items():
        stored = manifest.get(key)
        if key == "model" and stored is not None and _same_model(stored, value):
            continue
        if key in manifest and stored != value:
            raise UserError(
                f"{Path(folder) / MANIFEST_NAME}: collected with {key} = {stored!r}, the config asks {value!r}; set "
                f"data.init_args.{key}: {stored!r} to train on these trajectories, or a new data.init_args.path to "
                "collect into"
            )


def check_model_fingerprint(manifest: dict, fingerprint: str | None, folder: str | Path, model: str) -> None:
    """Refuse trajectories collected with other weights than `model` has now (None: not computable, passes)."""
    stored = manifest.get("model_fingerprint")
    if stored and fingerprint and stored != fingerprint:
        raise UserError(
            f"{Path(folder) / MANIFEST_NAME}: collected with model weights {stored}, but data.init_args.model "
            f"{model!r} now has weights {fingerprint}: the weights changed since collection; collect again into a "
            "new data.init_args.path, or point data.init_args.model at the weights the trajectories came from"
        )


def _same_model(stored: str, asked: str) -> bool:
    """Two model specs name the same model: equal, or the same existing path however it is spelled."""
    if stored == asked:
        return True
    return Path(stored).exists() and Path(asked).exists() and Path(stored).resolve() == Path(asked).resolve()


def check_token_ids(record: Record, vocab_size: int, where: str) -> None:
    """Every token id of a record must exist in the vocabulary (else training fails deep inside the embedding)."""
    lists = [record.prompt_ids, record.prefix_ids, *record.states, *record.augmented_states, record.labels or []]
    largest = max((max(ids) for ids in lists if ids), default=0)
    smallest = min((min(ids) for ids in lists if ids), default=0)
    if largest >= vocab_size or smallest < 0:
        bad = largest if largest >= vocab_size else smallest
        raise UserError(f"{where}: token id {bad} is outside the vocabulary (0..{vocab_size - 1}) of the tokenizer")

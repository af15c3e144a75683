"""Reading a sharded checkpoint folder (`torch.distributed.checkpoint`) without running code from it.

DCP stores the folder's index, `.metadata`, as a plain pickle and loads it with `pickle.load`; non-tensor values
(optimizer hyperparameters) sit in the shards as `torch.save` blobs that its default planner loads with
`weights_only=False`. Either runs any code a folder someone hands you carries. Here `.metadata` is read by an
unpickler that resolves only the DCP metadata classes, `torch.Size`, dtypes, layouts and paths, and every
non-tensor blob by `torch.load(weights_only=True)`:

- `load_sharded` loads through that reader and planner (what `cllm export` does);
- `check_sharded_checkpoint` reads the whole folder that way without loading it; `guard_checkpoint_loading` runs it
  before Lightning's own loader sees a folder (`fit --ckpt_path`), and turns a corrupt checkpoint into one line. A
  LoRA run's folder is checked against the run's base there too (`cllm.lora.check_checkpoint`): DCP reads the
  adapters into the model before any hook of the module could refuse them.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
from pathlib import Path, PurePath
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from cllm.errors import UserError
from cllm.lora import check_checkpoint

UNREADABLE = "cannot read this checkpoint (corrupt or truncated?)"
METADATA_FILE = ".metadata"  # DCP's index of the folder
LIGHTNING_META_FILE = "meta.pt"  # Lightning's hyperparameters, loop state etc. (read with weights_only=True)
ALLOWED_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided & co by name
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only `ALLOWED_GLOBALS` and torch dtypes: nothing else can be called."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a checkpoint index never holds")


def read_metadata(folder: Path) -> Metadata:
    """DCP's index of `folder`, unpickled with the allow-list; a `UserError` for anything else."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a sharded checkpoint (no {METADATA_FILE})")
    try:
        with path.open("rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except Exception as err:
        raise UserError(f"{path}: refused to load this checkpoint index: {exception_line(err)}") from None
    if not isinstance(metadata, Metadata):
        raise UserError(f"{path}: not a checkpoint index (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with `read_metadata` through the allow-list unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise UserError(f"{self.path}: per-rank checkpoint indexes are not supported")
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but a non-tensor value must load with `weights_only=True` first.

    The same bytes then go to the stock `load_bytes`: an unpickler that met only allowed globals does the same.
    """

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as err:
            fqn = read_item.dest_index.fqn
            raise UserError(f"refused the checkpoint value {fqn!r}: {exception_line(err)}") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def load_sharded(state: dict, folder: Path) -> None:
    """`dcp.load(state, folder)` in one process, reading nothing that could run code; failures as `UserError`."""
    import torch.distributed.checkpoint as dcp

    check_sharded_checkpoint(folder)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(folder), planner=SafeLoadPlanner(), no_dist=True)
    except CheckpointException as err:  # a BaseException: per-rank failures wrapped together
        raise UserError(f"{folder}: cannot read this sharded checkpoint: {_first_failure(err)}") from None
    except Exception as err:
        raise UserError(f"{folder}: cannot read this sharded checkpoint: {exception_line(err)}") from None


def check_sharded_checkpoint(folder: Path) -> None:
    """Read all of `folder` that DCP and Lightning would unpickle (index, non-tensor values, `meta.pt`) safely.

    After this returns, the stock loaders find only data in it: its index holds allowed classes alone and every
    non-tensor value loads with `weights_only=True`. Raises `UserError` (one line) otherwise.
    """
    folder = Path(folder)
    metadata = read_metadata(folder)
    byte_items = {fqn for fqn, item in metadata.state_dict_metadata.items() if isinstance(item, BytesStorageMetadata)}
    for index, info in metadata.storage_data.items():
        relative = PurePath(info.relative_path)
        if relative.is_absolute() or ".." in relative.parts:
            raise UserError(f"{folder}: the checkpoint index points outside its folder ({info.relative_path})")
        if getattr(info, "transform_descriptors", None):
            raise UserError(f"{folder}: transformed (compressed) shards are not supported")
        if not (folder / relative).is_file():
            raise UserError(f"{folder}: the shard {relative} listed in its {METADATA_FILE} is missing")
        if index.fqn not in byte_items:
            continue
        try:
            with open(folder / relative, "rb") as file:
                file.seek(info.offset)
                blob = file.read(info.length)
            torch.load(io.BytesIO(blob), weights_only=True)
        except Exception as err:
            raise UserError(f"{folder}: refused the value {index.fqn!r} in {relative}: {exception_line(err)}") from None
    meta = folder / LIGHTNING_META_FILE
    if meta.is_file():
        try:
            torch.load(meta, weights_only=True, map_location="cpu")
        except Exception as err:
            raise UserError(f"{meta}: refused to load: {exception_line(err)}") from None


def guard_checkpoint_loading(strategy: Any) -> None:
    """Make `strategy.load_checkpoint` check a sharded folder first and report unreadable checkpoints in one line."""
    load = strategy.load_checkpoint

    @functools.wraps(load)
    def checked_load(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        path = Path(checkpoint_path)
        if path.is_dir():
            check_sharded_checkpoint(path)
            check_adapters(strategy, path)
        elif not path.is_file():
            raise UserError(f"checkpoint not found: {checkpoint_path}")
        try:
            return load(checkpoint_path, *args, **kwargs)
        except CheckpointException as err:
            raise UserError(f"{checkpoint_path}: cannot read this checkpoint: {_first_failure(err)}") from None
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001 -- truncated zip, forbidden global, random bytes (any unpickler error)
            raise UserError(f"{checkpoint_path}: {UNREADABLE}: {exception_line(err)}") from None

    strategy.load_checkpoint = checked_load


def check_adapters(strategy: Any, folder: Path) -> None:
    """Refuse a sharded checkpoint whose base or adapter layout differs from the run's (`CLLMModule.lora_identity`)."""
    module = getattr(strategy, "lightning_module", None)
    meta = folder / LIGHTNING_META_FILE
    if module is None or not hasattr(module, "lora_identity") or not meta.is_file():
        return
    metadata = torch.load(meta, weights_only=True, map_location="cpu")
    check_checkpoint(metadata, module.lora_identity, str(folder))


def _first_failure(err: CheckpointException) -> str:
    for exception, _ in err.failures.values():
        return exception_line(exception)
    return "unknown failure"


def exception_line(err: BaseException) -> str:
    """An exception's message on one line (for `UserError`s that wrap a library's multi-line error)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(str(err).split())) or type(err).__name__
    if "WeightsUnpickler error: " in text:  # torch's advice on unsafe loading is no advice here
        reason = text.split("WeightsUnpickler error: ")[1].split(". ")[0]
        text = f"it holds objects that are not plain data ({reason})"
    return text[:300]

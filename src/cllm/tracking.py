"""Weights & Biases tracking: a `WandbLogger` that never fails for lack of network, and a reader for offline runs.

In a config:

    trainer:
      logger:
        class_path: cllm.tracking.WandbLogger
        init_args: {project: cllm, name: tiny, group: ablate-n, tags: [tiny]}

* Offline automatically when no API key is configured (no `WANDB_API_KEY`, no `~/.netrc` entry for the W&B host);
  an explicit `WANDB_MODE` (or `offline:`) always wins.
* Under SLURM the run id is derived from the job id (and array task), so a requeued job resumes the same W&B run.
* `read_offline_run` reads the run's `.wandb` transaction log (config, history, summary) without a server: the tests
  and the ablation collector use it.
"""

from __future__ import annotations

import csv
import json
import netrc
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from cllm.slurm import slurm_job_id

DEFAULT_HOST = "https://api.wandb.ai"


def wandb_api_key_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether wandb would find an API key: `WANDB_API_KEY`, or a netrc entry for the W&B host.

    Args:
        env: Environment to read (default `os.environ`).
    """
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL", DEFAULT_HOST)).hostname or "api.wandb.ai"
    netrc_path = Path(env.get("NETRC", Path(env.get("HOME", Path.home())) / ".netrc"))
    try:
        entry = netrc.netrc(str(netrc_path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def slurm_run_id(env: Mapping[str, str] | None = None) -> str | None:
    """A W&B run id that survives `scontrol requeue`: the job id keeps, the process does not.

    `slurm-<cluster>-<job>` or, for an array task, `slurm-<cluster>-<array job>_<task>`; None outside SLURM.
    """
    env = os.environ if env is None else env
    array_task = env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID")
    if not array_task and "SLURM_JOB_ID" not in env:
        return None
    return f"slurm-{env.get('SLURM_CLUSTER_NAME', 'cluster')}-{slurm_job_id(env)}"


def resolve_mode(offline: bool | None, env: Mapping[str, str] | None = None) -> str | None:
    """The wandb `mode`: an explicit `offline` flag, else `WANDB_MODE` (left to wandb), else offline without a key."""
    env = os.environ if env is None else env
    if offline is not None:
        return "offline" if offline else "online"
    if env.get("WANDB_MODE"):
        return None  # wandb reads it itself (online, offline, disabled, ...)
    return None if wandb_api_key_configured(env) else "offline"


class WandbLogger(LightningWandbLogger):
    """Lightning's `WandbLogger` with the cllm defaults: automatic offline mode and a requeue-stable run id.

    Args:
        project: W&B project (`WANDB_PROJECT` if unset, else "cllm").
        name: Display name of the run.
        group: Group runs together (an ablation sweep sets one group for all its overlays).
        tags: Free-form tags.
        notes: A longer description of the run.
        job_type: W&B job type, e.g. "fit" or "trajectories".
        entity: W&B user or team (default: the key's default entity).
        save_dir: Folder holding `wandb/`; default the trainer's `default_root_dir` (set by cllm's CLI), else ".".
        id: Run id; default derived from SLURM_JOB_ID under SLURM (see `slurm_run_id`), else random.
        offline: Force offline (True) or online (False); default None = `WANDB_MODE`, else offline without an API key.
        log_model: Upload checkpoints as artifacts (see Lightning's `WandbLogger`).
        prefix: Prefix added to every metric key.
        checkpoint_name: Name of the checkpoint artifact.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        job_type: str | None = None,
        entity: str | None = None,
        save_dir: str | None = None,
        id: str | None = None,
        offline: bool | None = None,
        log_model: bool | str = False,
        prefix: str = "",
        checkpoint_name: str | None = None,
    ) -> None:
        run_id = id or os.environ.get("WANDB_RUN_ID") or slurm_run_id()
        init_kwargs: dict[str, Any] = {"group": group, "tags": list(tags) if tags else None, "notes": notes}
        init_kwargs.update(job_type=job_type, entity=entity)
        mode = resolve_mode(offline)
        if mode is not None:
            # Passed to wandb.init rather than Lightning's `offline=True`, which rewrites os.environ for children too.
            init_kwargs["mode"] = mode
        super().__init__(
            name=name,
            save_dir=save_dir or ".",
            id=run_id,
            project=project or os.environ.get("WANDB_PROJECT", "cllm"),
            log_model=log_model,
            prefix=prefix,
            checkpoint_name=checkpoint_name,
            **{k: v for k, v in init_kwargs.items() if v is not None},
        )
        # resume="allow" (Lightning's default): the same id after a requeue continues the run instead of failing.
        self.mode = mode or os.environ.get("WANDB_MODE") or "online"


# --- Reading an offline run ------------------------------------------------------------------------------------
# The `.wandb` file is a LevelDB-style log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
# blocks of chunks, each `crc32 (4) | length (2) | type (1) | payload`; a record too long for a block is split into
# FIRST/MIDDLE/LAST chunks. Each record is a serialized `wandb_internal_pb2.Record`.
_FILE_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


@dataclass
class OfflineRun:
    """What an offline W&B run recorded."""

    path: Path
    run_id: str = ""
    project: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _iter_payloads(data: bytes):
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError("not a W&B transaction log (bad header)")
    pos, pending = _FILE_HEADER.size, b""
    while pos + _CHUNK_HEADER.size <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _CHUNK_HEADER.size:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        pos += _CHUNK_HEADER.size
        if pos + length > len(data):  # the last record of a run still being written
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == 0 and length == 0:  # zero padding at the end of a file still being written
            break
        if kind in (_FULL, _FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (_FULL, _LAST):
            yield pending
            pending = b""


def _item_value(item: Any) -> Any:
    if item.value_json:
        return json.loads(item.value_json)
    kind = item.WhichOneof("value") if item.DESCRIPTOR.oneofs_by_name.get("value") else None
    return None if kind in (None, "none") else getattr(item, kind)


def _set(target: dict[str, Any], item: Any, value: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = value


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_metrics_csv(run_dir: Path) -> list[dict[str, float]]:
    """Rows of every `metrics.csv` under `run_dir` (CSVLogger), oldest version first, empty cells dropped."""
    files = sorted(run_dir.rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)
    rows = []
    for file in files:
        for row in csv.DictReader(file.open(newline="")):
            values = {key: _number(value) for key, value in row.items() if key and value not in (None, "")}
            rows.append({key: value for key, value in values.items() if value is not None})
    return rows


def read_offline_run(path: str | os.PathLike) -> OfflineRun:
    """Read config, history and summary of a W&B run folder (`wandb/offline-run-*`) or its `run-*.wandb` file.

    Config values are unwrapped from wandb's `{"value": ...}` form; history rows are dicts of the logged keys.
    """
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {path}")
    run = OfflineRun(path=path)
    for payload in _iter_payloads(files[0].read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.project, run.group = record.run.run_id, record.run.project, record.run.run_group
            run.tags = list(record.run.tags)
            for item in record.run.config.update:
                _set(run.config, item, json.loads(item.value_json))
        elif kind == "config":
            for item in record.config.update:
                _set(run.config, item, json.loads(item.value_json))
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set(row, item, _item_value(item))
            run.history.append(row)
            run.summary.update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "summary":
            for item in record.summary.update:
                _set(run.summary, item, json.loads(item.value_json))
    run.config = {k: v.get("value", v) if isinstance(v, dict) else v for k, v in run.config.items()}
    return run

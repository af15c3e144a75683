"""The per-record scan of a dataset (prompt hash, sample count), cached beside the shards while they are unchanged."""

from __future__ import annotations

import hashlib
import struct
from array import array
from collections.abc import Callable
from pathlib import Path

from cllm.files import atomic_write_bytes


def cached_scan(
    folder: Path, key: str, cacheable: bool, scan: Callable[[array, array], int]
) -> tuple[array, array, int]:
    """(prompt hashes, sample counts, truncated records): `scan(hashes, counts)` fills them on the first run; later
    runs with the same `key` (shards, checksums and settings) read them back: 10 bytes per record, fine at 10^8."""
    cache = folder / f".scan-{hashlib.sha256(key.encode()).hexdigest()[:16]}.bin"
    hashes, counts = array("d"), array("H")
    if cacheable and cache.is_file():
        data = cache.read_bytes()
        total, truncated = struct.unpack("<qq", data[:16])
        hashes.frombytes(data[16 : 16 + 8 * total])
        counts.frombytes(data[16 + 8 * total :])
        return hashes, counts, truncated
    truncated = scan(hashes, counts)
    try:  # a read-only dataset folder only costs the next run another scan
        if cacheable:
            header = struct.pack("<qq", len(hashes), truncated)
            atomic_write_bytes(cache, header + hashes.tobytes() + counts.tobytes())
    except OSError:
        pass
    return hashes, counts, truncated

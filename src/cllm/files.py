"""Generic file helpers: atomic writes, sha256 of a file, reading JSON and text lines, a string's place in [0, 1).

Every file cllm writes goes through `atomic_write_bytes` (temp file in the same folder + fsync + rename), so a
reader, or a killed writer, only ever sees the old or the complete new content.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cllm.errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same folder + fsync + os.replace: never a half-written file under `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600 files; datasets are shared like any other file
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
        except OSError as err:  # a full disk: name the file, not just the errno
            raise OSError(err.errno, err.strerror, str(path)) from err
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, payload) -> None:
    """Write indented JSON atomically: a killed run never leaves half a result."""
    atomic_write_text(path, json.dumps(payload, indent=2) + "\n")


def read_json_file(path: Path):
    """Parse a whole JSON file; malformed JSON is a UserError naming file and line."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for the non-blank lines of a text file, read lazily."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def count_lines(path: Path) -> int:
    """Non-blank lines of a text file."""
    return sum(1 for _ in iter_lines(path))


def unit_hash(text: str) -> float:
    """A string's stable place in [0, 1) (first 8 bytes of its sha256): splits by id that never move."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64

"""Atomic file output: a result is either complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from safetensors.torch import save


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are ordinary files
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_bytes(path, data: bytes) -> None:
    """Write `data` atomically; a full disk or a read-only folder raises OSError naming the file."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_safetensors(path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Serialised in memory, then written by write_bytes: same mode as every other file, and a full
    disk is a plain OSError (ENOSPC), not an error from inside the serialiser. The same tensors and
    metadata give the same bytes (`sorted_metadata`), so a rerun's file and its hash in the manifest
    are the first run's."""
    write_bytes(path, sorted_metadata(save(tensors, metadata=metadata)))


def sorted_metadata(data: bytes) -> bytes:
    """A safetensors file with the metadata of its header in key order. safetensors 0.8 writes the
    metadata from a hash map, in an order that changes from one process to the next (the tensors'
    entries are sorted already). The header is rewritten in place, padded with spaces to its length
    as the format allows; anything unexpected leaves the bytes as they are."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__")
    if not meta:
        return data
    header["__metadata__"] = dict(sorted(meta.items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return data if len(text) > n else data[:8] + text.ljust(n, b" ") + data[8 + n:]


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporary files of writes interrupted by a kill (`.NAME.XXXX.tmp`); call only while
    holding the folder's lock, so that no live writer owns them."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed

"""Checkpoints: written atomically, named by their sha256, the last two kept, loaded without
unpickling arbitrary objects.

`DIR/checkpoints/step-NNNNNNNNN-SHA256.pt`: the name carries the sha256 of the file's bytes, so a
checkpoint proves its own integrity in one atomic rename; a file whose bytes do not match its name
(a flipped bit, a torn copy) is skipped on load and the one before it is used.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path
from typing import Iterator

import torch

from ..atomic import write_bytes

PATTERN = re.compile(r"^step-(\d{9})-([0-9a-f]{64})\.pt$")
KEEP = 2


class CheckpointError(ValueError):
    """A checkpoint that fails its checksum or cannot be read."""


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str | Path, step: int, state: dict) -> Path:
    """Serialise `state` in memory, write it atomically under its checksum, keep the newest KEEP."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_dir(out) / f"step-{step:09d}-{hashlib.sha256(data).hexdigest()}.pt"
    write_bytes(path, data)
    for old in list_checkpoints(out):
        if old != path and (old.name[:14] == path.name[:14]):  # the same step saved before
            old.unlink(missing_ok=True)
    for old in list_checkpoints(out)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint files, oldest first (temporary files of interrupted writes are ignored)."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if PATTERN.match(p.name) and p.is_file())


def read_checkpoint(path: Path) -> dict:
    """The state in `path` after its bytes were checked against the checksum in its name."""
    match = PATTERN.match(path.name)
    if match is None:
        raise CheckpointError(f"{path.name}: not a checkpoint name")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != match.group(2):
        raise CheckpointError(f"{path.name}: checksum mismatch (the file was damaged)")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # a consistent file that still does not load (e.g. made by another torch)
        raise CheckpointError(f"{path.name}: cannot be loaded ({str(err).splitlines()[0] if str(err) else err!r})")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name}: does not hold a state dict")
    return state


def candidates(out: str | Path) -> Iterator[tuple[Path, dict | CheckpointError]]:
    """(path, state) newest first; a checkpoint that fails its checks gives its CheckpointError instead."""
    for path in reversed(list_checkpoints(out)):
        try:
            yield path, read_checkpoint(path)
        except (CheckpointError, OSError) as err:
            yield path, err if isinstance(err, CheckpointError) else CheckpointError(f"{path.name}: {err}")


def load_latest(out: str | Path) -> dict | None:
    """The newest checkpoint that passes its checksum and loads; None if there is none at all."""
    errors = []
    for path, state in candidates(out):
        if not isinstance(state, CheckpointError):
            return state
        errors.append(str(state))
    if errors:
        raise CheckpointError(f"no checkpoint in {checkpoint_dir(out)} could be loaded ({'; '.join(errors)})")
    return None

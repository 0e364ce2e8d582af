"""Checkpoints: written atomically, the last two kept, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .io import atomic_write

PATTERN = re.compile(r"^step-(\d{9})\.pt$")
KEEP = 2


def checkpoint_dir(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(out: str | Path, step: int, state: dict) -> Path:
    """Write DIR/checkpoints/step-NNNNNNNNN.pt atomically, then delete all but the newest KEEP."""
    folder = checkpoint_dir(out)
    path = folder / f"step-{step:09d}.pt"
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_checkpoints(out)[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoint files, oldest first (temporary files of interrupted writes are ignored)."""
    folder = checkpoint_dir(out)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if PATTERN.match(p.name))


def load_latest(out: str | Path) -> dict | None:
    """The newest checkpoint that loads; a damaged newest one falls back to the one before."""
    errors = []
    for path in reversed(list_checkpoints(out)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a damaged file: try the previous one
            errors.append(f"{path.name}: {err}")
    if errors:
        raise ValueError(f"no checkpoint in {checkpoint_dir(out)} could be loaded ({'; '.join(errors)})")
    return None

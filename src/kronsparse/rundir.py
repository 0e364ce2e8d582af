"""Run folders: checked before any compute is spent, locked while in use, and sealed by a manifest.

- `open_folder(out)` refuses an empty name, a file, or a folder that cannot be created or written,
  then takes an exclusive lock (`DIR/.lock`, flock: the kernel drops it when the process dies, so
  a kill never leaves a stale lock) and deletes temporary files left by killed writes.
- `seal(folder, files)` writes `manifest.json` last: the sha256 of every result file. `unseal`
  deletes it before new results are written, so a folder killed halfway has no manifest, and a
  folder whose files come from two runs fails `verify`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

from .atomic import remove_stale_temporaries, write_json

LOCK = ".lock"
MANIFEST = "manifest.json"
RESULT_FILES = ("config.json", "model.safetensors", "metrics.json")


class RunFolderError(ValueError):
    """An output folder that cannot be used, is in use, or holds an incomplete or mixed result."""


def check_out(out, what: str = "--out") -> Path:
    """The folder `out`, created if needed; RunFolderError unless it is a writable folder."""
    if out is None or not str(out).strip():
        raise RunFolderError(f"{what} must name a folder, got {str(out)!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{what} {path}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {path}: the folder is not writable")
    for name in (*RESULT_FILES, MANIFEST, LOCK):  # found out only after training, otherwise
        if (path / name).is_dir():
            raise RunFolderError(f"{what} {path}: {name} is a folder; the run writes a file there")
    if (path / "checkpoints").exists() and not (path / "checkpoints").is_dir():
        raise RunFolderError(f"{what} {path}: checkpoints is a file; the run keeps its checkpoints in a folder there")
    return path


class FolderLock:
    """An exclusive, non-blocking lock on DIR/.lock; the file holds the owner's pid for the message."""

    def __init__(self, folder: Path, what: str = "--out") -> None:
        self.folder, self.fd = folder, None
        try:
            self.fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # read-only file system, permissions
            raise RunFolderError(f"{what} {folder}: cannot write in the folder ({err.strerror or err})") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"{what} {folder} is in use by another kronsparse process (pid {owner}); "
                                     "wait for it to end or choose another folder") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (deleting it would race)
            self.fd = None


@contextlib.contextmanager
def open_folder(out, what: str = "--out") -> Iterator[Path]:
    """Check `out`, lock it for this process and clean what killed writers left behind."""
    folder = check_out(out, what)
    lock = FolderLock(folder, what)
    try:
        for sub in (folder, folder / "checkpoints"):
            if sub.is_dir():
                remove_stale_temporaries(sub)
        yield folder
    finally:
        lock.release()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unseal(folder) -> None:
    """Delete the manifest before results are (re)written: until sealed again, the folder is unfinished."""
    path = Path(folder) / MANIFEST
    if path.exists():
        path.unlink()
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def seal(folder, files=RESULT_FILES) -> dict:
    """Write manifest.json, last: a run id and the sha256 of every result file."""
    folder = Path(folder)
    manifest = {"run_id": uuid.uuid4().hex, "files": {name: _sha256(folder / name) for name in files}}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify(folder) -> dict:
    """The manifest of a complete run; RunFolderError saying what is wrong otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise RunFolderError(f"{folder} holds no complete run (no {MANIFEST}: unfinished, interrupted while "
                             "writing its results, or written by kronsparse before 0.1 manifests)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and set(RESULT_FILES) <= set(files)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise RunFolderError(f"{path} is damaged") from None
    for name, digest in files.items():
        target = folder / name
        if not target.is_file():
            raise RunFolderError(f"{folder}: {name} is missing (its manifest lists it)")
        if _sha256(target) != digest:
            raise RunFolderError(f"{folder}: {name} is not the file its manifest lists (changed, damaged, or "
                                 "written by another run): a torn or mixed folder")
    return manifest


def finished_metrics(folder) -> dict | None:
    """metrics.json of the complete run in `folder`, or None when there is none or it is torn."""
    try:
        verify(folder)
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (RunFolderError, ValueError, OSError):
        return None
    return metrics if isinstance(metrics, dict) and isinstance(metrics.get("config"), dict) else None

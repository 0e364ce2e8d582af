"""Byte-level text corpora for language modelling: ``pycode``, the CPython 3.11 standard library's source.

``load_text("pycode", context=128)`` returns a :class:`~kronsparse.data.Dataset` whose samples are
non-overlapping windows of ``context`` bytes: x (N, T) uint8 byte ids, y (N, T) int64 the next byte
of each position. Train, val and test come from different source files (the corpus README says how
they were split), so nothing of val or test is seen in training. Val is in ``x_val``/``y_val``,
test in ``x_test``/``y_test``.

Each ``.gz`` file is checked against the sha256 in the corpus README before it is decompressed (a
truncated or altered file fails here, with one line naming it); the files are searched for where
MNIST's are (``data_dir``, ``$KRONSPARSE_DATA/pycode/``, the user cache). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import zlib
from pathlib import Path
from typing import Optional

import torch

from .data import DataError, Dataset, PathLike, _check_data_dir, _one_line, search_dirs

# sha256 of the .gz files, from shared/data/pycode/README.md
TEXT_DATASETS: dict[str, dict[str, str]] = {
    "pycode": {
        "train.txt.gz": "6020d2924d9641a2a8f62cdb429e401b4aec6cbcc54c9d4fe240ee6aa4c15365",
        "val.txt.gz": "8773b546d3e0339f7a6a9a138966035f777dfa98418651477ff408002dedcebd",
        "test.txt.gz": "b8f790ca1801d028fbbd8fb50d04fbeb5061aa8796e46917bea9517cdf87ad90",
    },
}
_MAX_GZ = 16 * 2**20  # the largest registered .gz is 1.1 MB
_MAX_TEXT = 64 * 2**20  # and decompresses to 4.7 MB


def _check_name(name: str) -> dict[str, str]:
    if name not in TEXT_DATASETS:
        raise ValueError(f"unknown text dataset {name!r}; valid names: {', '.join(TEXT_DATASETS)}")
    return TEXT_DATASETS[name]


def find_text_dir(name: str, data_dir: Optional[PathLike] = None) -> Path:
    """The first searched folder holding every file of `name`; DataError naming them and the folders."""
    files = _check_name(name)
    if data_dir is not None:
        _check_data_dir(Path(data_dir))
    folders = search_dirs(name, data_dir)
    for folder in folders:
        if all((folder / f).is_file() for f in files):
            return folder
    raise DataError(f"{name}: data files not found; put {', '.join(files)} in one of: "
                    f"{', '.join(str(f) for f in folders)}")


def read_checked(path: Path, sha256: str) -> bytes:
    """The decompressed bytes of `path` after its compressed bytes matched `sha256`."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_GZ + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({_one_line(exc)})") from exc
    if len(raw) > _MAX_GZ:
        raise DataError(f"{path}: larger than {_MAX_GZ} bytes; not the registered file")
    actual = hashlib.sha256(raw).hexdigest()
    if actual != sha256:
        raise DataError(f"{path}: checksum mismatch: expected sha256 {sha256[:16]}..., got {actual[:16]}... "
                        "(truncated, corrupt, or not the registered file)")
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            text = stream.read(_MAX_TEXT + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupted data ({_one_line(exc)})") from exc
    if len(text) > _MAX_TEXT:
        raise DataError(f"{path}: decompresses to more than {_MAX_TEXT} bytes")
    return text


@functools.lru_cache(maxsize=2)
def read_splits(name: str, data_dir: Optional[str] = None) -> dict[str, bytes]:
    """{"train": bytes, "val": bytes, "test": bytes} of corpus `name`, checksummed once per process."""
    files = _check_name(name)
    folder = find_text_dir(name, data_dir)
    return {f.split(".")[0]: read_checked(folder / f, s) for f, s in files.items()}


def windows(data: bytes, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: x (N, T) uint8 and y (N, T) int64, y[i, j] the byte after x[i, j]."""
    n = (len(data) - 1) // context
    if n < 1:
        raise DataError(f"a split of {len(data)} bytes holds no window of {context} + 1 bytes")
    tokens = torch.frombuffer(bytearray(data[: n * context + 1]), dtype=torch.uint8)
    return tokens[:-1].reshape(n, context).clone(), tokens[1:].reshape(n, context).long()


def load_text(name: str, context: int, data_dir: Optional[PathLike] = None) -> Dataset:
    """Corpus `name` cut into windows of `context` bytes: train, val (x_val) and test."""
    if not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be an integer >= 1, got {context!r}")
    splits = read_splits(name, None if data_dir is None else str(data_dir))
    (xt, yt), (xv, yv), (xs, ys) = (windows(splits[s], context) for s in ("train", "val", "test"))
    return Dataset(name, xt, yt, xs, ys, num_classes=256, x_val=xv, y_val=yv)

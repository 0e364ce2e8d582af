"""Datasets: MNIST and Fashion-MNIST from IDX files, or the user's own ``.npz``.

``load_dataset("mnist")`` returns a :class:`Dataset` of flat float32 inputs ``(N, F)`` and int64
labels ``(N,)``. Every bad-data condition raises :class:`DataError` with one line that names the
file and what is wrong, so the command line can print it without a traceback.

IDX files are read defensively: the header is checked against a sane bound before anything is
allocated, the payload is read in chunks (memory follows what the file really holds, never what
its header claims), and the payload length must match the header exactly. Registered files are
checked against the sha256 of their decompressed bytes before use.

Where the files are looked for, in order:

1. ``data_dir`` (holding the four files directly, or a ``<name>/`` subfolder);
2. ``$KRONSPARSE_DATA/<name>/``;
3. the user cache ``$XDG_CACHE_HOME/kronsparse/<name>/`` (default ``~/.cache/kronsparse/<name>/``),
   which is where ``download=True`` puts them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import math
import os
import stat
import struct
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from ..limits import env_name, limit

PathLike = Union[str, "os.PathLike[str]"]

IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dims (n, rows, cols)
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dim (n,)
_KNOWN_MAGICS = {IMAGES_MAGIC: "images", LABELS_MAGIC: "labels"}
_GZIP_MAGIC = b"\x1f\x8b"
_MAX_PAYLOAD = 2**31  # no real IDX file comes near 2 GiB; a header that claims more is corrupt
_MAX_HEADER = 4 + 4 * 3
_MAX_REGISTERED = 64 * 2**20  # the largest registered file decompresses to 47 MB
_MAX_DOWNLOAD = 64 * 2**20  # the largest registered .gz is 26 MiB
_CHUNK = 2**20
_DOWNLOAD_TIMEOUT_S = 30.0
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class DataError(ValueError):
    """Missing or bad data. The message is one line naming the file and what is wrong."""


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"


@dataclass(frozen=True)
class IdxSource:
    """A registered IDX dataset: its four files, their sha256 and where to download them."""

    sha256: Mapping[str, str]  # file name -> sha256 of the DECOMPRESSED bytes
    mirrors: tuple[str, ...]  # base URLs, tried in order; the file name is appended
    num_classes: int = 10


# MNIST sums: shared/data/mnist/README.md (the values public projects pin for the official files).
# Fashion-MNIST sums: computed from Debian's `dataset-fashion-mnist` package and identical to the
# values other public projects pin after checking the archives against Zalando's published MD5s.
DATASETS: dict[str, IdxSource] = {
    "mnist": IdxSource(
        sha256={
            TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": IdxSource(
        sha256={
            TRAIN_IMAGES: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            TRAIN_LABELS: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            TEST_IMAGES: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            TEST_LABELS: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    ),
}


@dataclass(frozen=True)
class Dataset:
    """Train and test splits as tensors, ready for a classifier.

    ``input_mean`` / ``input_std`` are the global statistics subtracted and divided out when the
    data was standardised (0.0 and 1.0 when it was not), in the units of the unstandardised inputs.
    """

    name: str
    x_train: torch.Tensor  # (N_train, F) float32
    y_train: torch.Tensor  # (N_train,) int64
    x_test: torch.Tensor  # (N_test, F) float32
    y_test: torch.Tensor  # (N_test,) int64
    num_classes: int
    input_mean: float = 0.0
    input_std: float = 1.0

    @property
    def num_features(self) -> int:
        """F, the length of one flattened input."""
        return self.x_train.shape[1]


# --------------------------------------------------------------------------------------------
# Reading IDX files
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    """The first line of an exception's message, prefixed by its type."""
    lines = str(exc).splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _open_maybe_gzip(path: Path) -> BinaryIO:
    """Open ``path`` for reading, through gzip when it starts with the gzip magic bytes."""
    try:
        with path.open("rb") as probe:
            is_gzip = probe.read(2) == _GZIP_MAGIC
        return gzip.open(path, "rb") if is_gzip else path.open("rb")  # type: ignore[return-value]
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({_one_line(exc)})") from exc


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` (gzip or raw); any failure while reading becomes a one-line DataError."""
    stream = _open_maybe_gzip(path)
    try:
        with stream:
            yield stream
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupted or unreadable data ({_one_line(exc)})") from exc


def _read_at_most(stream: BinaryIO, limit: int) -> bytearray:
    """Read up to ``limit`` bytes in chunks, so memory grows only with what is really there."""
    data = bytearray()
    while len(data) < limit:
        chunk = stream.read(min(_CHUNK, limit - len(data)))
        if not chunk:
            break
        data += chunk
    return data


def _read_exactly(stream: BinaryIO, path: Path, size: int, what: str) -> bytes:
    """Read ``size`` header bytes or raise a DataError saying the header is too short."""
    data = _read_at_most(stream, size)
    if len(data) < size:
        raise DataError(f"{path}: file too short for the IDX {what} ({len(data)} of {size} bytes)")
    return bytes(data)


def _read_header(stream: BinaryIO, path: Path) -> tuple[int, tuple[int, ...]]:
    """Read the big-endian IDX header: the magic number, then one uint32 per dimension."""
    (magic,) = struct.unpack(">I", _read_exactly(stream, path, 4, "magic number"))
    if magic not in _KNOWN_MAGICS:
        known = ", ".join(f"{m} ({kind})" for m, kind in _KNOWN_MAGICS.items())
        raise DataError(f"{path}: bad IDX magic number {magic}; expected one of {known}")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", _read_exactly(stream, path, 4 * ndim, "header"))
    return magic, dims


def _check_header(
    path: Path,
    magic: int,
    dims: tuple[int, ...],
    expected_magic: Optional[int],
    max_items: Optional[int],
) -> None:
    """Reject a header of the wrong kind, with too many items, or claiming an absurd size."""
    if expected_magic is not None and magic != expected_magic:
        raise DataError(
            f"{path}: IDX magic {magic} ({_KNOWN_MAGICS[magic]}), expected {expected_magic} "
            f"({_KNOWN_MAGICS.get(expected_magic, 'unknown')})"
        )
    if max_items is not None and dims[0] > max_items:
        raise DataError(f"{path}: header claims {dims[0]} items, more than the {max_items} allowed")
    if math.prod(dims) > _MAX_PAYLOAD:
        raise DataError(f"{path}: header claims shape {dims}, over the {_MAX_PAYLOAD}-byte bound")


def _read_payload(stream: BinaryIO, path: Path, expected_len: int) -> bytearray:
    """Read the data bytes; their count must equal what the header promises, exactly."""
    payload = _read_at_most(stream, expected_len + 1)  # one extra byte reveals trailing data
    if len(payload) < expected_len:
        raise DataError(
            f"{path}: truncated: the header promises {expected_len} data bytes, "
            f"the file holds {len(payload)}"
        )
    if len(payload) > expected_len:
        raise DataError(f"{path}: trailing bytes after the {expected_len} data bytes of the header")
    return payload


def read_idx(
    path: PathLike, expected_magic: Optional[int] = None, max_items: Optional[int] = None
) -> np.ndarray:
    """Read one IDX file, gzip-compressed or raw (detected by the gzip magic bytes).

    Returns uint8 images ``(n, rows, cols)`` for magic 2051 or labels ``(n,)`` for magic 2049.
    ``expected_magic`` demands one kind; ``max_items`` caps the item count the header may claim.
    Raises DataError for a bad magic, a short header, a size over 2**31 bytes, a payload longer or
    shorter than the header says, or a corrupted gzip stream.
    """
    path = Path(path)
    with _reading(path) as stream:
        magic, dims = _read_header(stream, path)
        _check_header(path, magic, dims, expected_magic, max_items)
        payload = _read_payload(stream, path, math.prod(dims))
    return np.frombuffer(payload, dtype=np.uint8).reshape(dims)


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------

_VERIFIED: set[tuple[str, int, int, str]] = set()  # (path, size, mtime_ns, sha256) seen to match


def sha256_of_contents(path: PathLike, max_bytes: int = _MAX_PAYLOAD + _MAX_HEADER) -> str:
    """The sha256 of a file's decompressed bytes (of its raw bytes when it is not gzip)."""
    path = Path(path)
    digest, total = hashlib.sha256(), 0
    with _reading(path) as stream:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise DataError(f"{path}: decompresses to more than {max_bytes} bytes")
            digest.update(chunk)
    return digest.hexdigest()


def _verification_key(path: Path, expected_sha256: str) -> tuple[str, int, int, str]:
    """What identifies one verified version of a file within this process."""
    try:
        stat = path.stat()
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({_one_line(exc)})") from exc
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, expected_sha256


def verify_sha256(path: PathLike, expected_sha256: str) -> None:
    """Raise DataError unless the decompressed bytes of ``path`` have this sha256.

    A success is remembered per (path, size, mtime) in this process, so reloads skip the hash.
    """
    path = Path(path)
    key = _verification_key(path, expected_sha256)
    if key in _VERIFIED:
        return
    actual = sha256_of_contents(path, _MAX_REGISTERED)  # a gzip bomb under a registered name stops early
    if actual != expected_sha256:
        raise DataError(
            f"{path}: checksum mismatch: expected sha256 {expected_sha256[:16]}..., "
            f"got {actual[:16]}... (corrupt, or not the official file)"
        )
    _VERIFIED.add(key)


# --------------------------------------------------------------------------------------------
# Finding and downloading the registered files
# --------------------------------------------------------------------------------------------


def _source(name: str) -> IdxSource:
    """The registry entry for ``name``, or ValueError listing the valid names."""
    if name not in DATASETS:
        valid = ", ".join([*DATASETS, "npz:PATH"])
        raise ValueError(f"unknown dataset {name!r}; valid names: {valid}")
    return DATASETS[name]


def cache_dir(name: str) -> Path:
    """The user cache folder for dataset ``name`` (honours XDG_CACHE_HOME)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "kronsparse" / name


def search_dirs(name: str, data_dir: Optional[PathLike] = None) -> list[Path]:
    """The folders searched for dataset ``name``, in order of preference."""
    dirs = []
    if data_dir is not None:
        dirs += [Path(data_dir), Path(data_dir) / name]
    env_root = os.environ.get("KRONSPARSE_DATA")
    if env_root:
        dirs.append(Path(env_root) / name)
    dirs.append(cache_dir(name))
    return dirs


def find_dataset_dir(name: str, data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The first searched folder that holds all four files of ``name``, or None."""
    files = _source(name).sha256
    for folder in search_dirs(name, data_dir):
        if all((folder / file_name).is_file() for file_name in files):
            return folder
    return None


def _fetch(url: str, target: Path, expected_sha256: str) -> None:
    """Download ``url`` to ``target`` through a temp file, keeping it only if its sum matches."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(
            url, timeout=_DOWNLOAD_TIMEOUT_S
        ) as response:
            body = _read_at_most(response, _MAX_DOWNLOAD + 1)
            if len(body) > _MAX_DOWNLOAD:
                raise DataError(f"{url}: larger than {_MAX_DOWNLOAD} bytes")
            out.write(body)
        verify_sha256(tmp_name, expected_sha256)
        os.replace(tmp_name, target)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


def _download_file(file_name: str, source: IdxSource, folder: Path) -> None:
    """Fetch one file from the first mirror that serves it intact."""
    failures = []
    for mirror in source.mirrors:
        url = mirror + file_name
        try:
            _fetch(url, folder / file_name, source.sha256[file_name])
            return
        except (OSError, DataError) as exc:  # URLError and timeouts are OSErrors
            failures.append(f"{url}: {_one_line(exc)}")
    raise DataError(f"could not download {file_name} ({'; '.join(failures)})")


def _download(name: str) -> Path:
    """Download the missing files of ``name`` into its cache folder and return the folder."""
    source, folder = _source(name), cache_dir(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{folder}: cannot create the cache folder ({_one_line(exc)})") from exc
    for file_name in source.sha256:
        if not (folder / file_name).is_file():
            _download_file(file_name, source, folder)
    return folder


def _not_found(name: str, data_dir: Optional[PathLike], reason: str) -> DataError:
    """A DataError saying which files to put where."""
    files = ", ".join(_source(name).sha256)
    folders = ", ".join(str(d) for d in search_dirs(name, data_dir))
    return DataError(f"{name}: data files not found; put {files} in one of: {folders} ({reason})")


def _check_data_dir(path: Path) -> None:
    """A data_dir given explicitly must be a readable folder (or absent): a symlink loop, a file or
    an unreadable folder is an error, not a silent fall back to the next place searched."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise DataError(f"{path}: the data folder is a dangling symbolic link") from None
        return  # absent: the other places are searched, and the error lists them all
    except OSError as exc:  # ELOOP, EACCES on a parent, ...
        raise DataError(f"{path}: cannot use the data folder ({_one_line(exc)})") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise DataError(f"{path}: the data folder is not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise DataError(f"{path}: the data folder is not readable")


def locate_dataset(name: str, data_dir: Optional[PathLike] = None, download: bool = True) -> Path:
    """The folder holding the files of ``name``, downloading them into the cache if allowed."""
    if data_dir is not None:
        _check_data_dir(Path(data_dir))
    folder = find_dataset_dir(name, data_dir)
    if folder is not None:
        return folder
    if not download:
        raise _not_found(name, data_dir, "downloading is off")
    try:
        return _download(name)
    except DataError as exc:
        raise _not_found(name, data_dir, f"download failed: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Building datasets
# --------------------------------------------------------------------------------------------


def _read_registered(folder: Path, file_name: str, source: IdxSource, magic: int) -> np.ndarray:
    """Verify one registered file's checksum, then read it."""
    path = folder / file_name
    verify_sha256(path, source.sha256[file_name])
    return read_idx(path, expected_magic=magic)


def _idx_split(
    folder: Path, source: IdxSource, images_file: str, labels_file: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (x (N, F) float32 in [0, 1], y (N,) int64), with its labels checked."""
    images = _read_registered(folder, images_file, source, IMAGES_MAGIC)  # (N, rows, cols)
    labels = _read_registered(folder, labels_file, source, LABELS_MAGIC)  # (N,)
    if len(images) != len(labels):
        raise DataError(f"{folder / labels_file}: {len(labels)} labels for {len(images)} images")
    if labels.size and labels.max() >= source.num_classes:
        raise DataError(
            f"{folder / labels_file}: label {labels.max()} out of range 0..{source.num_classes - 1}"
        )
    x = torch.from_numpy(images.reshape(len(images), -1)).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(labels).to(torch.int64)


def _load_registered(name: str, data_dir: Optional[PathLike], download: bool) -> Dataset:
    """Load a registered IDX dataset (MNIST, Fashion-MNIST)."""
    source = _source(name)
    folder = locate_dataset(name, data_dir, download)
    x_train, y_train = _idx_split(folder, source, TRAIN_IMAGES, TRAIN_LABELS)
    x_test, y_test = _idx_split(folder, source, TEST_IMAGES, TEST_LABELS)
    if x_train.shape[1] != x_test.shape[1]:
        pixels = f"{x_train.shape[1]} pixels per train image, {x_test.shape[1]} per test image"
        raise DataError(f"{folder}: {pixels}")
    return Dataset(name, x_train, y_train, x_test, y_test, source.num_classes)


# --------------------------------------------------------------------------------------------
# The user's own data (.npz)
# --------------------------------------------------------------------------------------------


def _read_npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The four arrays of an .npz, read without ever unpickling."""
    if path.exists() and not path.is_file():  # a FIFO would block forever, a folder fails obscurely
        raise DataError(f"{path}: not a regular file")
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive (a single .npy array?)")
        with archive:
            missing = [key for key in NPZ_KEYS if key not in archive.files]
            if missing:
                need = ", ".join(NPZ_KEYS)
                raise DataError(f"{path}: missing arrays {', '.join(missing)} (need {need})")
            _check_npz_sizes(path, archive.zip)
            return {key: archive[key] for key in NPZ_KEYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, zlib.error, MemoryError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: unreadable .npz ({_one_line(exc)})") from exc


def _npy_header(zf: zipfile.ZipFile, key: str) -> Optional[tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) from the .npy header of member ``key``, reading no payload; None if unparsable."""
    name = key + ".npy" if key + ".npy" in zf.namelist() else key
    with zf.open(name) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            return None  # numpy's own reader decides (and bounds the header size)
    return tuple(int(d) for d in shape), dtype


def _check_npz_sizes(path: Path, zf: zipfile.ZipFile) -> None:
    """Refuse, from the headers alone, arrays whose size would exceed the memory bound once loaded.

    A few compressed bytes can claim a (10**6, 1000) array: numpy allocates what the header claims
    before reading, and the inputs are then cast to float32 (4 bytes per value).
    """

    bound, input_bytes = limit("data_bytes"), 0
    for key in NPZ_KEYS:
        header = _npy_header(zf, key)
        if header is None:
            continue
        shape, dtype = header
        n = math.prod(shape)
        sizes = [n * dtype.itemsize] + ([n * 4] if key.startswith("x_") else [])
        input_bytes += sizes[-1] if key.startswith("x_") else 0
        if max(sizes) > bound or input_bytes > bound:
            raise DataError(
                f"{path}: {key} claims shape {shape} of {dtype}, over the {bound}-byte bound on the data "
                f"held in memory (set {env_name('data_bytes')} to allow more)"
            )


def _npz_inputs(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """Check one input array and return it as float32 ``(N, F)``."""
    if x.ndim not in (2, 3):
        raise DataError(f"{path}: {key} has shape {x.shape}; expected (N, F) or (N, H, W)")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{path}: {key} has dtype {x.dtype}; expected numbers")
    if len(x) == 0:
        raise DataError(f"{path}: {key} is empty")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, rejected just below
        x = x.reshape(len(x), -1).astype(np.float32, copy=False)  # (N, F)
    finite_rows = np.isfinite(x).all(axis=1)  # (N,)
    if not finite_rows.all():
        row = int(np.argmin(finite_rows))
        raise DataError(f"{path}: {key} holds NaN or inf (first in row {row})")
    return x


def _npz_labels(path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    """Check one label array (integers >= 0, one per input) and return it as int64 ``(N,)``."""
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{path}: {key} has shape {y.shape}; expected ({n},), one label per input")
    if np.issubdtype(y.dtype, np.floating):
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{path}: {key} holds non-integral float labels")
    elif not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: {key} has dtype {y.dtype}; expected integer labels")
    if (y < 0).any():
        raise DataError(f"{path}: {key} holds negative labels (min {y.min()})")
    if y.max() >= limit("classes"):  # before the cast: a uint64 label >= 2**63 would turn negative
        raise DataError(f"{path}: the largest label, {y.max()}, makes {int(y.max()) + 1} classes, over the "
                        f"limit of {limit('classes')} (set {env_name('classes')} to allow more)")
    return y.astype(np.int64)


def load_npz(path: PathLike) -> Dataset:
    """Load the user's own data from an .npz holding x_train, y_train, x_test, y_test.

    x may be ``(N, F)`` or ``(N, H, W)`` (flattened to ``(N, H*W)``) and is cast to float32 as
    given; y must hold integer labels >= 0 (integral floats are accepted). num_classes is the
    largest label in either split plus one. Pickled (object) arrays are refused.
    """
    path = Path(path)
    arrays = _read_npz_arrays(path)
    x_train = _npz_inputs(path, "x_train", arrays["x_train"])
    x_test = _npz_inputs(path, "x_test", arrays["x_test"])
    if x_train.shape[1] != x_test.shape[1]:
        features = f"x_train has {x_train.shape[1]} features, x_test {x_test.shape[1]}"
        raise DataError(f"{path}: {features}")
    y_train = _npz_labels(path, "y_train", arrays["y_train"], len(x_train))
    y_test = _npz_labels(path, "y_test", arrays["y_test"], len(x_test))
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    tensors = [torch.from_numpy(a) for a in (x_train, y_train, x_test, y_test)]
    return Dataset(f"npz:{path}", *tensors, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def _global_mean_std(x: torch.Tensor, chunk_rows: int = 8192) -> tuple[float, float]:
    """Mean and (population) std of all entries of x, in float64, a chunk of rows at a time."""
    count = x.numel()
    mean = sum(float(part.sum(dtype=torch.float64)) for part in x.split(chunk_rows)) / count
    squares = sum(float((part.double() - mean).square().sum()) for part in x.split(chunk_rows))
    return mean, math.sqrt(squares / count)


def standardized(dataset: Dataset) -> Dataset:
    """Subtract one global mean and divide by one global std, both taken on the train inputs."""
    mean, std = _global_mean_std(dataset.x_train)
    if std == 0.0:
        raise DataError(f"{dataset.name}: the train inputs are constant; cannot standardise")
    return dataclasses.replace(
        dataset,
        x_train=(dataset.x_train - mean).div_(std),  # one new tensor per split, not two
        x_test=(dataset.x_test - mean).div_(std),
        input_mean=mean,
        input_std=std,
    )


def load_dataset(
    spec: str,
    data_dir: Optional[PathLike] = None,
    download: bool = True,
    standardize: bool = False,
) -> Dataset:
    """Load ``"mnist"``, ``"fashion-mnist"`` or ``"npz:PATH"`` as a :class:`Dataset`.

    IDX inputs are pixels / 255, flattened to ``(N, 784)``. With ``standardize=True`` one global
    mean and std of the train inputs are removed from both splits and recorded on the result.
    ``download=True`` fetches missing registered files into the user cache; otherwise, or if that
    fails, a DataError names the files and the folders searched.
    """
    if spec.startswith("npz:"):
        dataset = load_npz(spec[len("npz:"):])
    else:
        dataset = _load_registered(spec, data_dir, download)
    return standardized(dataset) if standardize else dataset


def subset(dataset: Dataset, n_train: int, n_test: int) -> Dataset:
    """The first ``n_train`` train and ``n_test`` test samples (all of a split if it has fewer)."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"subset sizes must be >= 0, got n_train={n_train}, n_test={n_test}")
    return dataclasses.replace(
        dataset,
        x_train=dataset.x_train[:n_train].clone(),
        y_train=dataset.y_train[:n_train].clone(),
        x_test=dataset.x_test[:n_test].clone(),
        y_test=dataset.y_test[:n_test].clone(),
    )

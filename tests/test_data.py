"""Tests for kronsparse.training.data: IDX and .npz reading, checksums, search order, downloads.

Offline: every test builds tiny files in tmp_path, except the real-MNIST tests that read
shared/data (or $KRONSPARSE_DATA). ``urlopen`` is replaced for every test, so none can reach
the network; the download tests serve fake bytes through it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import time
import tracemalloc
import urllib.error
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from kronsparse.training import data
from kronsparse.training.data import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    DataError,
    IdxSource,
)

REAL_DATA_ENV = os.environ.get("KRONSPARSE_DATA")  # read before the fixture below clears it
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MIRROR_A = "https://mirror-a.invalid/"
MIRROR_B = "https://mirror-b.invalid/"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array of 1 (labels) or 3 (images) dimensions."""
    magic = {1: LABELS_MAGIC, 3: IMAGES_MAGIC}[array.ndim]
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, content: bytes, compress: bool = True) -> Path:
    """Write ``content`` to ``path``, gzip-compressed unless told otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content, mtime=0) if compress else content)
    return path


def fake_idx_files(tag: int = 0, n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    """Decompressed bytes of a tiny 4x3-pixel dataset whose first train label is ``tag``."""
    rng = np.random.default_rng(tag)
    return {
        TRAIN_IMAGES: idx_bytes(rng.integers(0, 256, (n_train, 4, 3))),
        TRAIN_LABELS: idx_bytes((np.arange(n_train) + tag) % 10),
        TEST_IMAGES: idx_bytes(rng.integers(0, 256, (n_test, 4, 3))),
        TEST_LABELS: idx_bytes(np.arange(n_test) % 10),
    }


def write_fake_dataset(folder: Path, files: dict[str, bytes]) -> Path:
    """Write the files gzip-compressed into ``folder``."""
    for name, content in files.items():
        write(folder / name, content)
    return folder


def register(monkeypatch: pytest.MonkeyPatch, files: dict[str, bytes], name: str = "mnist") -> None:
    """Point the registry entry ``name`` at the checksums of these fake files."""
    sums = {file_name: hashlib.sha256(content).hexdigest() for file_name, content in files.items()}
    monkeypatch.setitem(data.DATASETS, name, IdxSource(sha256=sums, mirrors=(MIRROR_A, MIRROR_B)))


def write_npz(path: Path, **overrides: object) -> Path:
    """A small valid .npz (3 classes, 5 features), with any array replaced or removed (None)."""
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(8, 5)),
        "y_train": np.array([0, 1, 2, 0, 1, 2, 0, 1]),
        "x_test": rng.normal(size=(4, 5)),
        "y_test": np.array([2, 1, 0, 2]),
    }
    arrays.update(overrides)
    np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
    return path


def one_line(excinfo: pytest.ExceptionInfo) -> str:
    """The error message, asserted to be a single line."""
    message = str(excinfo.value)
    assert "\n" not in message
    return message


class FakeResponse(io.BytesIO):
    """What urlopen returns: a readable body usable as a context manager."""


UNPICKLED: list[str] = []


def _record_unpickle() -> str:
    UNPICKLED.append("unpickled")
    return "tripwire"


class Tripwire:
    """An object whose unpickling is recorded, to prove that no pickle is ever loaded."""

    def __reduce__(self) -> tuple[Callable[[], str], tuple[()]]:
        return _record_unpickle, ()


@pytest.fixture(autouse=True)
def offline_and_isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, no $KRONSPARSE_DATA, and a private user cache for every test."""

    def no_network(url: str, timeout: float = 0.0) -> None:
        raise AssertionError(f"a test tried to reach the network: {url}")

    monkeypatch.setattr(data.urllib.request, "urlopen", no_network)
    monkeypatch.delenv("KRONSPARSE_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


# --------------------------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    images_path = write(tmp_path / "images", idx_bytes(images), compress)
    labels_path = write(tmp_path / "labels", idx_bytes(labels), compress)

    np.testing.assert_array_equal(data.read_idx(images_path, IMAGES_MAGIC), images)
    np.testing.assert_array_equal(data.read_idx(labels_path, LABELS_MAGIC), labels)
    assert data.read_idx(images_path).dtype == np.uint8


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_payload(tmp_path: Path, compress: bool) -> None:
    path = write(tmp_path / "f", idx_bytes(np.zeros((3, 2, 2)))[:-1], compress)
    match = "truncated: the header promises 12 data bytes, the file holds 11"
    with pytest.raises(DataError, match=match) as exc:
        data.read_idx(path)
    assert str(path) in one_line(exc)


@pytest.mark.parametrize("compress", [True, False])
def test_trailing_bytes(tmp_path: Path, compress: bool) -> None:
    path = write(tmp_path / "f", idx_bytes(np.zeros(5)) + b"\x00", compress)
    with pytest.raises(DataError, match="trailing bytes") as exc:
        data.read_idx(path)
    one_line(exc)


@pytest.mark.parametrize(
    "header",
    [
        struct.pack(">4I", IMAGES_MAGIC, 2**31 - 1, 28, 28),  # over the 2**31-byte bound
        struct.pack(">2I", LABELS_MAGIC, 2**31 - 1),  # within the bound, but the file is tiny
        struct.pack(">4I", IMAGES_MAGIC, 2**32 - 1, 2**32 - 1, 2**32 - 1),
    ],
)
@pytest.mark.parametrize("compress", [True, False])
def test_huge_header_fails_fast_without_allocating(
    tmp_path: Path, header: bytes, compress: bool
) -> None:
    path = write(tmp_path / "f", header + bytes(100), compress)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(DataError, match="over the|truncated") as exc:
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line(exc)
    assert peak < 4 * 2**20, f"read_idx allocated {peak} bytes for a {len(header) + 100}-byte file"
    assert time.perf_counter() - start < 2.0


def test_max_items(tmp_path: Path) -> None:
    path = write(tmp_path / "f", idx_bytes(np.zeros(5)))
    assert data.read_idx(path, max_items=5).shape == (5,)
    with pytest.raises(DataError, match="claims 5 items, more than the 4 allowed"):
        data.read_idx(path, max_items=4)


def test_bad_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "f", struct.pack(">2I", 1234, 1) + b"\x00")
    with pytest.raises(DataError, match="bad IDX magic number 1234") as exc:
        data.read_idx(path)
    one_line(exc)


def test_unexpected_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "f", idx_bytes(np.zeros(2)))
    with pytest.raises(DataError, match=r"IDX magic 2049 \(labels\), expected 2051 \(images\)"):
        data.read_idx(path, expected_magic=IMAGES_MAGIC)


def _flip_crc(gz: bytes) -> bytes:
    return gz[:-8] + bytes(b ^ 0xFF for b in gz[-8:-4]) + gz[-4:]


def _cut_in_half(gz: bytes) -> bytes:
    return gz[: len(gz) // 2]


def _garble_middle(gz: bytes) -> bytes:
    return gz[:12] + b"\xff" * 16 + gz[28:]


def _append_junk(gz: bytes) -> bytes:
    return gz + b"not gzip"


@pytest.mark.parametrize("corrupt", [_flip_crc, _cut_in_half, _garble_middle, _append_junk])
def test_corrupted_gzip(tmp_path: Path, corrupt: Callable[[bytes], bytes]) -> None:
    rng = np.random.default_rng(0)
    gz = gzip.compress(idx_bytes(rng.integers(0, 256, (20, 8, 8))), mtime=0)
    path = write(tmp_path / "f.gz", corrupt(gz), compress=False)
    with pytest.raises(DataError, match="corrupted or unreadable data|truncated|trailing") as exc:
        data.read_idx(path)
    assert str(path) in one_line(exc)
    with pytest.raises(DataError, match="corrupted or unreadable data|checksum mismatch"):
        data.verify_sha256(path, hashlib.sha256(b"").hexdigest())


@pytest.mark.parametrize("compress", [True, False])
def test_empty_file(tmp_path: Path, compress: bool) -> None:
    path = write(tmp_path / "f", b"", compress)
    match = r"too short for the IDX magic number \(0 of 4 bytes\)"
    with pytest.raises(DataError, match=match) as exc:
        data.read_idx(path)
    one_line(exc)


def test_header_shorter_than_needed(tmp_path: Path) -> None:
    path = write(tmp_path / "f", struct.pack(">2I", IMAGES_MAGIC, 7))
    with pytest.raises(DataError, match=r"too short for the IDX header \(4 of 12 bytes\)"):
        data.read_idx(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot open"):
        data.read_idx(tmp_path / "absent.gz")


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------


def test_verify_sha256_of_decompressed_bytes(tmp_path: Path) -> None:
    content = idx_bytes(np.zeros(4))
    path = write(tmp_path / "f.gz", content)
    data.verify_sha256(path, hashlib.sha256(content).hexdigest())

    wrong = "ab" * 32
    match = "checksum mismatch: expected sha256 abababababababab"
    with pytest.raises(DataError, match=match) as exc:
        data.verify_sha256(path, wrong)
    assert hashlib.sha256(content).hexdigest()[:16] in one_line(exc)


def test_verification_is_cached_per_path_size_and_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    content = idx_bytes(np.zeros(4))
    path = write(tmp_path / "f.gz", content)
    expected = hashlib.sha256(content).hexdigest()
    data.verify_sha256(path, expected)

    def must_not_hash(path: Path) -> str:
        raise AssertionError("the verified file was hashed again")

    monkeypatch.setattr(data, "sha256_of_contents", must_not_hash)
    data.verify_sha256(path, expected)  # cached: no hash

    monkeypatch.undo()
    write(path, content + b"\x00")  # a new size and mtime: checked again
    with pytest.raises(DataError, match="checksum mismatch"):
        data.verify_sha256(path, expected)


def test_wrong_checksum_in_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = fake_idx_files()
    register(monkeypatch, files)
    write(tmp_path / "mnist" / TEST_LABELS, idx_bytes(np.ones(4)))  # other content
    write_fake_dataset(tmp_path / "mnist", {k: v for k, v in files.items() if k != TEST_LABELS})
    with pytest.raises(DataError, match=f"{TEST_LABELS}: checksum mismatch") as exc:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    one_line(exc)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_registry_checksums_are_those_of_the_real_files(name: str) -> None:
    """The registry against the real files in KRONSPARSE_DATA (../shared/data): a wrong or made-up
    sum fails here, not only on a user's machine after a download."""
    source = data.DATASETS[name]
    assert set(source.sha256) == {TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS}
    assert source.mirrors and source.num_classes == 10
    roots = ([Path(REAL_DATA_ENV)] if REAL_DATA_ENV else []) + [SHARED_DATA]
    folder = next((root / name for root in roots if (root / name).is_dir()), None)
    if folder is None:
        pytest.skip(f"no {name}/ in {', '.join(map(str, roots))} to check the checksums against")
    for file_name, expected in source.sha256.items():
        assert data.sha256_of_contents(folder / file_name) == expected, file_name


# --------------------------------------------------------------------------------------------
# Registered datasets from fake files
# --------------------------------------------------------------------------------------------


def test_load_fake_idx_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = fake_idx_files(tag=3)
    register(monkeypatch, files)
    write_fake_dataset(tmp_path, files)

    dataset = data.load_dataset("mnist", data_dir=tmp_path, download=False)
    assert dataset.x_train.shape == (6, 12) and dataset.x_train.dtype == torch.float32
    assert dataset.x_test.shape == (4, 12) and dataset.y_test.dtype == torch.int64
    assert dataset.y_train.tolist() == [3, 4, 5, 6, 7, 8]
    assert dataset.num_classes == 10 and dataset.num_features == 12
    assert (dataset.input_mean, dataset.input_std) == (0.0, 1.0)
    train_images = np.frombuffer(files[TRAIN_IMAGES], np.uint8, offset=16).reshape(6, 12)
    torch.testing.assert_close(dataset.x_train, torch.from_numpy(train_images / 255.0).float())


def test_labels_out_of_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = fake_idx_files()
    files[TRAIN_LABELS] = idx_bytes(np.array([0, 1, 2, 10, 4, 5]))
    register(monkeypatch, files)
    write_fake_dataset(tmp_path, files)
    with pytest.raises(DataError, match=f"{TRAIN_LABELS}: label 10 out of range 0..9") as exc:
        data.load_dataset("mnist", data_dir=tmp_path, download=False)
    one_line(exc)


def test_image_and_label_counts_must_match(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = fake_idx_files()
    files[TEST_LABELS] = idx_bytes(np.arange(3))
    register(monkeypatch, files)
    write_fake_dataset(tmp_path, files)
    with pytest.raises(DataError, match="3 labels for 4 images"):
        data.load_dataset("mnist", data_dir=tmp_path, download=False)


def test_unknown_dataset_lists_valid_names() -> None:
    match = "unknown dataset 'cifar'; valid names: mnist, fashion-mnist, npz:PATH"
    with pytest.raises(ValueError, match=match):
        data.load_dataset("cifar", download=False)


def test_cache_dir_honours_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.cache_dir("mnist") == tmp_path / "xdg-cache" / "kronsparse" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir("mnist") == tmp_path / "home" / ".cache" / "kronsparse" / "mnist"


def test_search_order_data_dir_then_env_then_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_place = {
        "data_dir": fake_idx_files(tag=1),
        "env": fake_idx_files(tag=2),
        "cache": fake_idx_files(tag=3),
    }
    folders = {
        "data_dir": write_fake_dataset(tmp_path / "explicit", by_place["data_dir"]),
        "env": write_fake_dataset(tmp_path / "env-root" / "mnist", by_place["env"]),
        "cache": write_fake_dataset(data.cache_dir("mnist"), by_place["cache"]),
    }
    monkeypatch.setenv("KRONSPARSE_DATA", str(tmp_path / "env-root"))

    def loads_from(place: str, data_dir: Path | None) -> None:
        assert data.find_dataset_dir("mnist", data_dir) == folders[place]
        register(monkeypatch, by_place[place])  # only that place's files pass the checksum
        dataset = data.load_dataset("mnist", data_dir=data_dir, download=False)
        assert dataset.y_train[0] == {"data_dir": 1, "env": 2, "cache": 3}[place]

    loads_from("data_dir", tmp_path / "explicit")
    loads_from("env", None)
    loads_from("env", tmp_path / "empty")  # a data_dir without the files falls through
    monkeypatch.delenv("KRONSPARSE_DATA")
    loads_from("cache", None)


def test_data_dir_may_hold_a_named_subfolder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_idx_files(tag=4)
    register(monkeypatch, files, name="fashion-mnist")
    write_fake_dataset(tmp_path / "fashion-mnist", files)
    dataset = data.load_dataset("fashion-mnist", data_dir=tmp_path, download=False)
    assert dataset.name == "fashion-mnist" and dataset.y_train[0] == 4


def test_missing_data_lists_the_folders_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KRONSPARSE_DATA", str(tmp_path / "env-root"))
    with pytest.raises(DataError, match="mnist: data files not found") as exc:
        data.load_dataset("mnist", data_dir=tmp_path / "mine", download=False)
    message = one_line(exc)
    for folder in [
        tmp_path / "mine",
        tmp_path / "mine" / "mnist",
        tmp_path / "env-root" / "mnist",
        tmp_path / "xdg-cache" / "kronsparse" / "mnist",
    ]:
        assert str(folder) in message
    for file_name in (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS):
        assert file_name in message
    assert "downloading is off" in message


# --------------------------------------------------------------------------------------------
# Downloads (served by a fake urlopen: never the network)
# --------------------------------------------------------------------------------------------


def serve(
    monkeypatch: pytest.MonkeyPatch, served: dict[str, bytes], requested: list[str]
) -> None:
    """Replace urlopen: MIRROR_A is down, MIRROR_B serves ``served`` (file name -> .gz bytes)."""

    def fake_urlopen(url: str, timeout: float) -> FakeResponse:
        requested.append(url)
        assert timeout > 0
        if url.startswith(MIRROR_A):
            raise urllib.error.URLError("mirror A is down")
        return FakeResponse(served[url.removeprefix(MIRROR_B)])

    monkeypatch.setattr(data.urllib.request, "urlopen", fake_urlopen)


def test_download_falls_back_to_the_next_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_idx_files(tag=5)
    register(monkeypatch, files)
    requested: list[str] = []
    serve(monkeypatch, {name: gzip.compress(c) for name, c in files.items()}, requested)

    dataset = data.load_dataset("mnist")  # download=True is the default
    assert dataset.y_train[0] == 5
    cache = data.cache_dir("mnist")
    assert sorted(p.name for p in cache.iterdir()) == sorted(files)  # no .part files left
    assert requested[:2] == [MIRROR_A + TRAIN_IMAGES, MIRROR_B + TRAIN_IMAGES]

    requested.clear()
    data.load_dataset("mnist")
    assert requested == []  # found in the cache: nothing fetched


def test_download_with_bad_checksum_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = fake_idx_files()
    register(monkeypatch, files)
    tampered = {name: gzip.compress(content + b"!") for name, content in files.items()}
    serve(monkeypatch, tampered, [])

    match = "download failed: could not download .*checksum mismatch"
    with pytest.raises(DataError, match=match) as exc:
        data.load_dataset("mnist")
    assert str(data.cache_dir("mnist")) in one_line(exc)
    assert list(data.cache_dir("mnist").iterdir()) == []


# --------------------------------------------------------------------------------------------
# The user's own .npz
# --------------------------------------------------------------------------------------------


def test_npz_flat_inputs(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz")
    dataset = data.load_dataset(f"npz:{path}")
    assert dataset.name == f"npz:{path}"
    assert dataset.x_train.shape == (8, 5) and dataset.x_train.dtype == torch.float32
    assert dataset.y_train.dtype == torch.int64 and dataset.num_classes == 3
    with np.load(path) as raw:
        torch.testing.assert_close(dataset.x_test, torch.from_numpy(raw["x_test"]).float())


def test_npz_image_inputs_are_flattened(tmp_path: Path) -> None:
    x_train = np.arange(8 * 2 * 3).reshape(8, 2, 3).astype(np.uint8)
    path = write_npz(tmp_path / "d.npz", x_train=x_train, x_test=np.ones((4, 2, 3)))
    dataset = data.load_npz(path)
    assert dataset.x_train.shape == (8, 6) and dataset.x_test.shape == (4, 6)
    assert dataset.x_train[1].tolist() == [6, 7, 8, 9, 10, 11]  # values as given, not / 255


def test_npz_num_classes_spans_both_splits(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", y_test=np.array([0, 6, 1, 2]))
    assert data.load_npz(path).num_classes == 7


def test_npz_accepts_integral_float_labels(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", y_test=np.array([2.0, 1.0, 0.0, 2.0]))
    assert data.load_npz(path).y_test.tolist() == [2, 1, 0, 2]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"y_test": None}, "missing arrays y_test"),
        ({"x_train": np.zeros(8)}, r"x_train has shape \(8,\); expected \(N, F\) or \(N, H, W\)"),
        ({"x_train": np.zeros((0, 5)), "y_train": np.zeros(0, int)}, "x_train is empty"),
        ({"x_test": np.zeros((4, 6))}, "x_train has 5 features, x_test 6"),
        ({"x_train": np.full((8, 5), np.nan)}, r"x_train holds NaN or inf \(first in row 0\)"),
        ({"x_test": np.array([[0.0] * 5, [np.inf] * 5] * 2)}, r"x_test holds NaN .*row 1\)"),
        ({"x_train": np.full((8, 5), 1e300)}, "x_train holds NaN or inf"),  # beyond float32
        ({"x_train": np.array([["a"] * 5] * 8)}, "x_train has dtype <U1; expected numbers"),
        ({"y_train": np.arange(7)}, r"y_train has shape \(7,\); expected \(8,\)"),
        ({"y_test": np.array([0, -1, 1, 2])}, "y_test holds negative labels"),
        ({"y_test": np.array([0.5, 1, 1, 2])}, "y_test holds non-integral float labels"),
        ({"y_test": np.array([np.nan, 1, 1, 2])}, "y_test holds non-integral float labels"),
        ({"y_test": np.array(["a", "b", "c", "d"])}, "y_test has dtype <U1; expected integer"),
        ({"y_test": np.array([True, False, True, False])}, "y_test has dtype bool"),
    ],
)
def test_npz_bad_contents(tmp_path: Path, overrides: dict[str, object], match: str) -> None:
    path = write_npz(tmp_path / "d.npz", **overrides)
    with pytest.raises(DataError, match=match) as exc:
        data.load_dataset(f"npz:{path}")
    assert one_line(exc).startswith(str(path))


def test_npz_truncated(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="unreadable .npz") as exc:
        data.load_npz(path)
    one_line(exc)


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(b"PK\x03\x04 but not really a zip archive")
    with pytest.raises(DataError, match="unreadable .npz"):
        data.load_npz(path)


def test_npz_single_npy_array_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(DataError, match="not an .npz archive"):
        data.load_npz(path)


def test_npz_object_array_is_never_unpickled(tmp_path: Path) -> None:
    trap = np.array([Tripwire()] * 8, dtype=object)
    path = write_npz(tmp_path / "d.npz", y_train=trap)
    with pytest.raises(DataError, match=r"unreadable \.npz .*allow_pickle=False"):
        data.load_npz(path)
    assert UNPICKLED == []


def test_plain_pickle_is_never_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    path.write_bytes(pickle.dumps(Tripwire()))
    with pytest.raises(DataError, match="unreadable .npz"):
        data.load_npz(path)
    assert UNPICKLED == []


def test_missing_npz(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unreadable .npz"):
        data.load_dataset(f"npz:{tmp_path / 'absent.npz'}")


# --------------------------------------------------------------------------------------------
# standardize and subset
# --------------------------------------------------------------------------------------------


def test_standardize_uses_train_statistics(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz")
    raw = data.load_npz(path)
    dataset = data.load_dataset(f"npz:{path}", standardize=True)
    mean = raw.x_train.double().mean().item()
    std = raw.x_train.double().std(unbiased=False).item()
    assert dataset.input_mean == pytest.approx(mean) and dataset.input_std == pytest.approx(std)
    assert dataset.x_train.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert dataset.x_train.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(dataset.x_test, (raw.x_test - mean) / std)


def test_standardize_refuses_constant_inputs(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", x_train=np.ones((8, 5)))
    with pytest.raises(DataError, match="constant"):
        data.load_dataset(f"npz:{path}", standardize=True)


def test_subset_takes_the_first_samples(tmp_path: Path) -> None:
    dataset = data.load_npz(write_npz(tmp_path / "d.npz"))
    small = data.subset(dataset, 3, 10)
    torch.testing.assert_close(small.x_train, dataset.x_train[:3])
    assert small.y_train.tolist() == [0, 1, 2] and len(small.y_test) == 4
    assert small.num_classes == dataset.num_classes
    with pytest.raises(ValueError, match=">= 0"):
        data.subset(dataset, -1, 1)


# --------------------------------------------------------------------------------------------
# The real MNIST files (always present in CI, beside the repository)
# --------------------------------------------------------------------------------------------


def real_mnist_root() -> Path:
    """The folder holding mnist/, or a test failure saying where the files were expected."""
    roots = ([Path(REAL_DATA_ENV)] if REAL_DATA_ENV else []) + [SHARED_DATA]
    for root in roots:
        if (root / "mnist" / TRAIN_IMAGES).is_file():
            return root
    pytest.fail(f"real MNIST not found in {', '.join(map(str, roots))} (set KRONSPARSE_DATA)")


@pytest.fixture(scope="module")
def mnist() -> data.Dataset:
    return data.load_dataset("mnist", data_dir=real_mnist_root(), download=False)


def test_real_mnist_shapes_and_labels(mnist: data.Dataset) -> None:
    assert mnist.x_train.shape == (60000, 784) and mnist.x_test.shape == (10000, 784)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.num_classes == 10
    assert mnist.y_train[:5].tolist() == [5, 0, 4, 1, 9]
    assert mnist.y_test[:5].tolist() == [7, 2, 1, 0, 4]
    train_counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    test_counts = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.y_train.bincount().tolist() == train_counts
    assert mnist.y_test.bincount().tolist() == test_counts


def test_real_mnist_pixels(mnist: data.Dataset) -> None:
    assert mnist.x_train.min().item() == 0.0 and mnist.x_train.max().item() == 1.0
    assert 0.0 <= mnist.x_test.min().item() and mnist.x_test.max().item() <= 1.0
    mean = mnist.x_train.sum(dtype=torch.float64).item() / mnist.x_train.numel()
    assert mean * 255 == pytest.approx(33.3184, abs=1e-3)


def test_real_mnist_standardized(mnist: data.Dataset) -> None:
    scaled = data.standardized(mnist)
    assert scaled.input_mean * 255 == pytest.approx(33.3184, abs=1e-3)
    assert scaled.input_std * 255 == pytest.approx(78.5675, abs=1e-3)
    assert abs(scaled.x_train[:1000].mean().item()) < 0.1

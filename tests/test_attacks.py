"""Hostile input and faults (issue 17): every attack below ends in one clear error, never a crash,
a hang, unbounded memory or a silently wrong result."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kronsparse import KronLinear
from kronsparse.export import ExportError, export_model
from kronsparse.functional import divisors
from kronsparse.inference import load_model
from kronsparse.models import FeedForward

pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def kron_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = FeedForward([KronLinear(16, 8, (2, 2), rank=2), KronLinear(8, 4, (2, 2), rank=2)])
    with torch.no_grad():
        model.layers[0].S[::2, 1::2] = 0  # some exact zero blocks
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    model = kron_mlp()
    return {fmt: export_model(model, root / f"m.{fmt}.safetensors", fmt, "mlp") for fmt in ("dense", "bsr", "factors")}


def tampered(src: Path, dst: Path, change) -> Path:
    """A copy of an export with change(tensors, meta) applied, written as a well-formed safetensors file."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    meta = json.loads(header["kronsparse"])
    change(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata={**header, "kronsparse": json.dumps(meta)})
    return dst


def set_(key, index, value):
    def change(t, meta):
        t[key] = t[key].clone()
        t[key][index] = value
    return change


BSR = "layers.0.weight."
ATTACKS = {
    "crow far past nnz (was a segfault)": set_(BSR + "crow_indices", 2, 10**9),
    "crow decreasing": set_(BSR + "crow_indices", 1, -5),
    "col out of range": set_(BSR + "col_indices", 0, 10**6),
    "col negative": set_(BSR + "col_indices", -1, -1),
    "col repeated in a row": lambda t, m: t.__setitem__(BSR + "col_indices", torch.zeros_like(t[BSR + "col_indices"])),
    "values nan": set_(BSR + "values", 0, float("nan")),
    "values wrong shape": lambda t, m: t.__setitem__(BSR + "values", t[BSR + "values"][:, :1]),
    "values integer": lambda t, m: t.__setitem__(BSR + "values", t[BSR + "values"].to(torch.int32)),
    "indices float": lambda t, m: t.__setitem__(BSR + "crow_indices", t[BSR + "crow_indices"].double()),
    "missing tensor": lambda t, m: t.pop(BSR + "values"),
    "huge shape in metadata": lambda t, m: m["layers"]["layers.0"].__setitem__("shape", [2**20, 2**20]),
    "negative shape": lambda t, m: m["layers"]["layers.0"].__setitem__("shape", [-8, 16]),
    "block shape that does not tile": lambda t, m: m["layers"]["layers.0"].__setitem__("block_shape", [3, 2]),
    "layers not an object": lambda t, m: m.__setitem__("layers", [1, 2]),
    "unknown stored kind": lambda t, m: m["layers"]["layers.0"].__setitem__("stored", "pickle"),
    "alias to nothing": lambda t, m: m.__setitem__("aliases", {"x": "nope"}),
    "bias wrong shape": lambda t, m: t.__setitem__("layers.0.bias", torch.zeros(3)),
    "layers that do not chain": lambda t, m: m["layers"].__setitem__("layers.5", m["layers"].pop("layers.1")),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_bsr_export_raises_export_error(exports, tmp_path, attack):
    path = tampered(exports["bsr"], tmp_path / "t.safetensors", ATTACKS[attack])
    with pytest.raises(ExportError):
        load_model(path)


@pytest.mark.parametrize("fmt,key", [("dense", "layers.0.weight"), ("factors", "layers.0.A"),
                                     ("factors", "layers.1.S")])
def test_nan_or_integer_weights_are_refused(exports, tmp_path, fmt, key):
    with pytest.raises(ExportError, match="NaN"):
        load_model(tampered(exports[fmt], tmp_path / "n.safetensors", set_(key, 0, float("nan"))))
    to_int = lambda t, m: t.__setitem__(key, t[key].to(torch.int64))  # noqa: E731
    with pytest.raises(ExportError, match="dtype"):
        load_model(tampered(exports[fmt], tmp_path / "i.safetensors", to_int))


@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_an_export_load_or_raise_export_error(exports, tmp_path, data):
    fmt = data.draw(st.sampled_from(sorted(exports)))
    raw = bytearray(exports[fmt].read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        model = load_model(path)
    except (ExportError, FileNotFoundError):
        return
    y = model(torch.randn(3, 16))
    assert y.shape == (3, 4) and torch.isfinite(y).all()


def test_divisors_is_fast_and_exact():
    assert all(divisors(n) == [d for d in range(1, n + 1) if n % d == 0] for n in range(1, 500))
    start = time.perf_counter()
    assert divisors(1_000_000_007) == [1, 1_000_000_007]  # a prime: counted to n one by one, this never returned
    assert len(divisors(2**40)) == 41
    assert time.perf_counter() - start < 1.0

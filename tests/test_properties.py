"""Property-based tests (hypothesis) of the functional core and bounded fuzzing of the data readers."""

import gzip
import io
import struct

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kronsparse import functional as F
from kronsparse.training import data

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def kron_case(draw):
    bo, bi = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    m1, n1 = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    rank = draw(st.integers(1, 3))
    n = draw(st.integers(1, 5))
    path = draw(st.sampled_from(["input_first", "factors_first", "materialize", "auto"]))
    seed = draw(st.integers(0, 2**16))
    return bo, bi, m1, n1, rank, n, path, seed


@FAST
@given(kron_case())
def test_layer_equals_dense_twin_for_random_shapes(case):
    bo, bi, m1, n1, rank, n, path, seed = case
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(m1, n1, generator=g, dtype=torch.float64) * (torch.rand(m1, n1, generator=g) > 0.3)
    A = torch.randn(rank, m1, n1, generator=g, dtype=torch.float64)
    B = torch.randn(rank, bo, bi, generator=g, dtype=torch.float64)
    x = torch.randn(n, n1 * bi, generator=g, dtype=torch.float64)
    W = sum(torch.kron(S * A[i], B[i]) for i in range(rank))  # the naive twin, the oracle
    torch.testing.assert_close(F.kron_linear(x, S, A, B, path=path), x @ W.t())
    built = F.kron_weight(S, A, B)  # the library's W (the export and metrics path)
    torch.testing.assert_close(built, W)
    assert F.block_mask_of(built, (bo, bi)).le(S != 0).all()  # a zero S entry always gives a zero block
    assert not built[~F.expand_block_mask(S != 0, (bo, bi))].any()  # exactly zero, not merely small


tensors = st.builds(lambda seed, n: torch.randn(n, generator=torch.Generator().manual_seed(seed)),
                    st.integers(0, 2**16), st.integers(1, 64))
thresholds = st.floats(0.0, 3.0)


@FAST
@given(tensors, thresholds)
def test_soft_threshold_properties(x, t):
    y = F.soft_threshold(x, t)
    assert y.abs().sum() <= x.abs().sum() + 1e-6  # never increases the l1 norm
    assert (y.abs() <= x.abs()).all() and (y * x >= 0).all()  # shrinks toward zero, never flips a sign
    assert not F.soft_threshold(torch.zeros_like(x), t).any()  # zero maps to zero
    assert (F.soft_threshold(y, t) == 0).logical_or(y != 0).all()  # zeros stay zero when applied again
    torch.testing.assert_close(F.soft_threshold(x, 0.0), x)  # threshold 0 is the identity


@FAST
@given(st.integers(0, 2**16), st.sampled_from([(1, 1), (2, 2), (2, 4), (4, 8)]), thresholds)
def test_group_shrink_properties(seed, block, t):
    W = torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))
    Y = F.group_shrink(W, block, t)
    before, after = F.block_norms(W, block), F.block_norms(Y, block)
    assert (after <= before + 1e-6).all()  # never increases any block's norm
    mask = F.block_mask_of(Y, block)
    torch.testing.assert_close(mask, before > t)  # exactly the blocks with norm <= t vanish
    assert not F.group_shrink(torch.zeros_like(W), block, t).any()
    torch.testing.assert_close(F.group_shrink(W, block, 0.0), W)
    bo, bi = block
    expanded = F.expand_block_mask(mask, block)
    rows, cols = torch.arange(W.shape[0])[:, None] // bo, torch.arange(W.shape[1])[None, :] // bi
    assert torch.equal(expanded, mask[rows, cols])  # the library's expansion against its definition
    assert torch.equal(Y * expanded, Y)  # the block mask of Y covers every non-zero of Y
    again = F.group_shrink(Y, block, t)
    assert not again[~expanded].any()  # a zero block stays zero under the proximal map
    assert torch.equal(F.block_mask_of(again, block), F.block_norms(Y, block) > t)


@FAST
@given(st.integers(0, 2**16), thresholds)
def test_group_norm_shrink_properties(seed, t):
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(seed))
    y = F.group_norm_shrink(x, t)
    assert torch.linalg.vector_norm(y) <= torch.linalg.vector_norm(x) + 1e-6
    assert not F.group_norm_shrink(torch.zeros_like(x), t).any()
    if y.any():  # the direction is kept
        torch.testing.assert_close(y / y.norm(), x / x.norm())


def idx_bytes(kind: str, n: int) -> bytes:
    if kind == "images":
        return struct.pack(">IIII", 2051, n, 2, 2) + bytes(range(4 * n))
    return struct.pack(">II", 2049, n) + bytes(i % 10 for i in range(n))


@settings(max_examples=150, deadline=2000)
@given(kind=st.sampled_from(["images", "labels"]), n=st.integers(0, 20), draws=st.data())
def test_idx_reader_fuzz_only_clean_errors(kind, n, draws, tmp_path_factory):
    raw = bytearray(idx_bytes(kind, n))
    action = draws.draw(st.sampled_from(["truncate", "flip", "random", "append", "gzip-truncate"]))
    if action == "truncate":
        raw = raw[: draws.draw(st.integers(0, max(0, len(raw) - 1)))]
    elif action == "flip" and raw:
        raw[draws.draw(st.integers(0, len(raw) - 1))] ^= draws.draw(st.integers(1, 255))
    elif action == "random":
        raw = bytearray(draws.draw(st.binary(max_size=64)))
    elif action == "append":
        raw += draws.draw(st.binary(min_size=1, max_size=8))
    payload = gzip.compress(bytes(raw))
    if action == "gzip-truncate":
        payload = payload[: draws.draw(st.integers(0, len(payload) - 1))]
    path = tmp_path_factory.mktemp("idx") / "f.gz"
    path.write_bytes(payload)
    try:
        arr = data.read_idx(path)
    except data.DataError as err:
        assert str(err).count("\n") == 0
    else:
        assert arr.nbytes <= len(raw)  # nothing beyond the file's real size


@settings(max_examples=80, deadline=2000)
@given(cut=st.integers(1, 400), draws=st.data())
def test_npz_reader_fuzz_only_clean_errors(cut, draws, tmp_path_factory):
    buf = io.BytesIO()
    np.savez(buf, x_train=np.zeros((4, 3), np.float32), y_train=np.arange(4), x_test=np.zeros((2, 3), np.float32),
             y_test=np.arange(2))
    raw = bytearray(buf.getvalue())
    if draws.draw(st.booleans()):
        raw = raw[: max(1, len(raw) - cut)]
    else:
        raw[cut % len(raw)] ^= 0xFF
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    path.write_bytes(bytes(raw))
    try:
        ds = data.load_npz(path)
    except data.DataError as err:
        assert str(err).count("\n") == 0
    else:
        assert ds.x_train.shape == (4, 3)

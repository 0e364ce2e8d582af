"""The per-step fast paths are exact: each gives bit for bit what the code it replaces gives (that code
is the oracle), so no committed training result moves."""

import pytest
import torch

from kronsparse import kernels


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits (so -0.0 differs from 0.0 and a NaN's payload counts)."""
    return t.contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("grid", [(3, 5, 2, 2), (4, 3, 1, 1), (2, 6, 3, 4), (5, 2, 2, 1)])  # (m1, n1, bo, bi)
@pytest.mark.parametrize("to_blocks", [True, False])
def test_word_reorder_moves_the_same_bits_as_the_strided_copy(dtype, grid, to_blocks):
    m1, n1, bo, bi = grid
    t = torch.randn(m1 * n1 * bo * bi, dtype=torch.float64).to(dtype)
    t[::7] = -0.0
    word = kernels._word_dtype(t, bi)
    if bi * t.element_size() > 8:
        assert word is None  # no integer that wide: the other paths
        return
    assert torch.equal(bits(kernels._word_transpose(t, grid, to_blocks, word)),
                       bits(kernels._strided_reorder(t, grid, to_blocks)))


def test_word_reorder_refuses_what_it_cannot_view():
    t = torch.randn(41)
    assert kernels._word_dtype(t[1:], 2) is None  # a run of 2 floats would start off an 8-byte boundary
    assert kernels._word_dtype(t[:40].view(4, 10).t(), 2) is None  # not contiguous
    assert kernels._word_dtype(torch.randn(8, dtype=torch.complex64), 1) is None


@pytest.mark.parametrize("to_blocks", [True, False])
def test_word_reorder_gradient(to_blocks):
    grid = (3, 4, 2, 1)  # bi = 1 in float64: one int64 word per element
    t = torch.randn(24, dtype=torch.float64, requires_grad=True)
    word = kernels._word_dtype(t, 1)
    assert torch.autograd.gradcheck(lambda x: kernels._WordReorder.apply(x, grid, to_blocks, word), (t,))

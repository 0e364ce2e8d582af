"""The functional core against a naive dense twin built with torch.kron."""

import pytest
import torch

from kronsparse import functional as F
from kronsparse import kernels

SHAPES = [  # (out, in, block_shape)
    (8, 12, (2, 2)),  # square blocks
    (10, 784, (2, 16)),  # the paper's MNIST "16x2"
    (6, 8, (3, 2)),  # rectangular, taller than wide
    (6, 8, (1, 1)),  # every weight its own block
    (6, 8, (6, 8)),  # the whole matrix as one block
]
PATHS = ["input_first", "factors_first", "materialize", "auto"]


def dense_twin(S, A, B):
    return sum(torch.kron(S * A[i], B[i]) for i in range(A.shape[0]))


def factors(out, inp, block, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bo, bi = block
    m1, n1 = out // bo, inp // bi
    S = torch.randn(m1, n1, generator=g, dtype=dtype)
    S[0, 0] = 0.0  # one pruned block
    A = torch.randn(rank, m1, n1, generator=g, dtype=dtype)
    B = torch.randn(rank, bo, bi, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (S, A, B)]


@pytest.mark.parametrize("out,inp,block", SHAPES)
@pytest.mark.parametrize("rank", [1, 2, 3, 4])
def test_kron_weight_matches_torch_kron(out, inp, block, rank):
    S, A, B = factors(out, inp, block, rank, torch.float64)
    W = F.kron_weight(S, A, B)
    assert W.shape == (out, inp)
    torch.testing.assert_close(W, dense_twin(S, A, B))
    assert not W[: block[0], : block[1]].any()  # S[0, 0] == 0 zeroes block (0, 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("out,inp,block", SHAPES)
@pytest.mark.parametrize("rank", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (3, 4)])
@pytest.mark.parametrize("path", PATHS)
def test_kron_linear_forward_and_grads_match_dense_twin(dtype, out, inp, block, rank, bias, lead, path):
    S, A, B = factors(out, inp, block, rank, dtype)
    b = torch.randn(out, dtype=dtype, requires_grad=True) if bias else None
    x = torch.randn(*lead, inp, dtype=dtype, requires_grad=True)
    gy = torch.randn(*lead, out, dtype=dtype)

    y = F.kron_linear(x, S, A, B, b, path=path)
    grads = torch.autograd.grad(y, [x, S, A, B] + ([b] if bias else []), gy)

    y_ref = torch.nn.functional.linear(x, dense_twin(S, A, B), b)
    grads_ref = torch.autograd.grad(y_ref, [x, S, A, B] + ([b] if bias else []), gy)

    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(y, y_ref, **tol)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, **tol)


@pytest.mark.parametrize("path", ["input_first", "factors_first", "materialize"])
@pytest.mark.parametrize("leaf", [True, False])
def test_input_gradient_layouts(path, leaf):
    """A leaf input gets a row-major gx where the path can give one (its .grad needs that layout);
    an intermediate one may get a transposed view. Both equal the dense twin's."""
    S, A, B = factors(12, 32, (4, 4), 2, torch.float32)
    x0 = torch.randn(16, 32, requires_grad=True)
    x = x0 if leaf else x0 * 1.0
    gy = torch.randn(16, 12)
    (gx,) = torch.autograd.grad(F.kron_linear(x, S, A, B, path=path), [x], gy)
    torch.testing.assert_close(gx, gy @ dense_twin(S, A, B), rtol=1e-4, atol=1e-4)
    if leaf and path != "factors_first":
        assert gx.is_contiguous()


@pytest.mark.parametrize("path", ["input_first", "factors_first", "materialize"])
def test_gradcheck_every_path(path):
    S, A, B = factors(6, 8, (3, 2), 2, torch.float64)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: F.kron_linear(*t, path=path), (x, S, A, B, b))


@pytest.mark.parametrize("gather_max,short_runs_max", [(1 << 30, 0), (0, 1 << 30), (0, 0)])
def test_materialize_reorders_blocks_both_ways(monkeypatch, gather_max, short_runs_max):
    """The cached-index gather, the gather with a gather backward and the strided copy."""
    monkeypatch.setattr(kernels, "_GATHER_MAX", gather_max)
    monkeypatch.setattr(kernels, "_GATHER_MAX_SHORT_RUNS", short_runs_max)
    S, A, B = factors(6, 8, (3, 2), 2, torch.float64)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: F.kron_linear(*t, path="materialize"), (x, S, A, B))
    torch.testing.assert_close(F.kron_weight(S, A, B), dense_twin(S, A, B))


def test_factored_paths_save_only_their_inputs():
    """The r-times-larger intermediate is recomputed in backward, never stored."""
    S, A, B = factors(64, 64, (4, 4), 4, torch.float32)
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        F.kron_linear(x, S, A, B, path="input_first")
    assert sum(saved) == x.numel() + S.numel() + A.numel() + B.numel()


@pytest.mark.parametrize("path", ["input_first", "factors_first"])
@pytest.mark.parametrize("chunk_rows", [64, 5])  # one chunk, and chunks of a transposed input's rows
def test_a_transposed_input_is_used_in_place(path, chunk_rows, monkeypatch):
    """A features-major input (what a factored layer returns when its rows fit one chunk) is saved for
    backward as it is, not copied beside itself, and gives the dense twin's output and gradients."""
    monkeypatch.setattr(kernels, "chunk_rows", lambda *args: chunk_rows)
    S, A, B = factors(12, 32, (4, 4), 2, torch.float64)
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True).t()  # (16, 32), strides (1, 16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.untyped_storage().data_ptr()) or t,
                                                  lambda t: t):
        y = F.kron_linear(x, S, A, B, path=path)
    assert x.untyped_storage().data_ptr() in saved
    gy = torch.randn_like(y)
    gx, gS = torch.autograd.grad(y, [x, S], gy)
    W = dense_twin(S, A, B)
    torch.testing.assert_close(y, x @ W.t())
    torch.testing.assert_close(gx, gy @ W)
    (gS_twin,) = torch.autograd.grad(x.detach() @ dense_twin(S, A, B).t(), [S], gy)
    torch.testing.assert_close(gS, gS_twin)


def test_bad_inputs_give_clear_errors():
    S, A, B = factors(8, 12, (2, 2), 2, torch.float32)
    with pytest.raises(ValueError, match="expected 12"):
        F.kron_linear(torch.randn(3, 10), S, A, B)
    with pytest.raises(ValueError, match="unknown path 'fast'"):
        F.kron_linear(torch.randn(3, 12), S, A, B, path="fast")
    with pytest.raises(ValueError, match="share dtype"):
        F.kron_weight(S, A.double(), B)
    with pytest.raises(ValueError, match="factor shapes disagree"):
        F.kron_weight(S, A[:, :1], B)
    with pytest.raises(ValueError, match=r"bo must divide out \(\[1, 2, 5, 10\]\)"):
        F.check_block_shape(10, 784, (16, 2))
    with pytest.raises(ValueError, match=r"transposed shape \(2, 16\) tiles it"):
        F.check_block_shape(10, 784, (16, 2))


def test_block_helpers_on_a_hand_made_weight():
    W = torch.zeros(4, 6)
    W[0, 0] = 3.0  # block (0, 0) of (2, 3) blocks
    W[3, 5] = -4.0  # block (1, 1)
    torch.testing.assert_close(F.block_norms(W, (2, 3)), torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    mask = F.block_mask_of(W, (2, 3))
    assert mask.tolist() == [[True, False], [False, True]]
    assert F.block_sparsity(W, (2, 3)) == 0.5
    dense = F.expand_block_mask(mask, (2, 3))
    assert dense.shape == W.shape and dense.sum() == 12 and dense[3, 5] and not dense[0, 3]
    assert F.block_view(W, (2, 3))[1, 1, 1, 2] == -4.0


def test_proximal_maps_exact_values():
    x = torch.tensor([-3.0, -0.5, 0.0, 0.5, 2.0])
    assert F.soft_threshold(x, 1.0).tolist() == [-2.0, -0.0, 0.0, 0.0, 1.0]
    W = torch.zeros(2, 4)
    W[:, :2] = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # block norm 5
    W[:, 2:] = 0.1  # block norm 0.2
    out = F.group_shrink(W, (2, 2), 1.0)
    torch.testing.assert_close(out[:, :2], W[:, :2] * 0.8)
    assert not out[:, 2:].any()
    torch.testing.assert_close(F.group_norm_shrink(torch.tensor([3.0, 4.0]), 1.0), torch.tensor([2.4, 3.2]))
    assert not F.group_norm_shrink(torch.tensor([0.3, 0.4]), 1.0).any()
    assert F.group_lasso_penalty(W, (2, 2)).item() == pytest.approx(2 * (5 + 0.2))


@pytest.mark.parametrize("path", ["input_first", "factors_first", "materialize"])
def test_every_fast_path_equals_the_einsum_reference(path):
    """kernels' paths against functional's one-einsum definition, values and gradients."""
    g = torch.Generator().manual_seed(0)
    S, A, B = torch.randn(3, 4, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(2, 2, 5, generator=g)
    S[0, 1] = 0.0
    x, bias = torch.randn(2, 7, 20, generator=g), torch.randn(6, generator=g)
    leaves = [t.clone().requires_grad_() for t in (x, S, A, B, bias)]
    twins = [t.clone().requires_grad_() for t in (x, S, A, B, bias)]
    y = F.kron_linear(*leaves[:4], leaves[4], path=path)
    ref = F.kron_linear_reference(*twins[:4], twins[4])
    torch.testing.assert_close(y, ref)
    gy = torch.randn(y.shape, generator=g)
    (y * gy).sum().backward()
    (ref * gy).sum().backward()
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad, b.grad)

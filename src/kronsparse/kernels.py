"""The fast paths of `kron_linear`: what runs, not what it means (that is functional.py).

Three ways to compute x Wᵀ + b for W = sum_i kron(S * A[i], B[i]) (costs.choose_path picks one):

- "input_first":   Z_i = X B_iᵀ first (contracts the bi columns inside each block), then
                   Y = sum_i (S*A_i) Z_i. Intermediate (r, N, n1, bo).
- "factors_first": T_i = (S*A_i) X first (contracts the n1 block columns), then
                   Y = sum_i T_i B_iᵀ. Intermediate (r, N, m1, bi).
- "materialize":   build W once and do one dense matmul (plain autograd: on small layers its
                   backward, a few C++ nodes, beats a Python one).

The factored paths run in a custom autograd function that saves only its inputs and recomputes the
r-times-larger intermediate in backward. Every path is tested against functional's reference.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .costs import choose_path

PATHS = ("auto", "input_first", "factors_first", "materialize")


def _build_weight(C: Tensor, B: Tensor) -> Tensor:
    """W from C = S*A: one rank-r GEMM into (m1, n1, bo, bi) block-major order, then one reordering."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    M = torch.mm(C.reshape(r, m1 * n1).t(), B.reshape(r, bo * bi))  # (m1*n1, bo*bi)
    return _reorder(M, (m1, n1, bo, bi), to_blocks=False).view(m1 * bo, n1 * bi)


# Below this many elements the block reordering is a gather with a cached index: a strided copy
# whose inner run is bi (often 2) elements long costs 2-5x more there; above it, the copy wins,
# except for runs of bi <= 2 up to a million elements (MLP 784->300 at 2x2: a whole training step
# 0.55 ms faster, 7.5%), where a gather with a gather as its backward is used.
_GATHER_MAX = 1 << 16
_GATHER_RUN, _GATHER_MAX_SHORT_RUNS = 2, 1 << 20


@functools.lru_cache(maxsize=64)
def _reorder_index(grid: tuple[int, int, int, int], to_blocks: bool, device: torch.device) -> Tensor:
    m1, n1, bo, bi = grid
    idx = torch.arange(m1 * n1 * bo * bi, device=device)
    if to_blocks:  # entry k of the (m1, n1, bo, bi) tensor reads this entry of the (m1, bo, n1, bi) one
        return idx.view(m1, bo, n1, bi).transpose(1, 2).reshape(-1)
    return idx.view(m1, n1, bo, bi).transpose(1, 2).reshape(-1)


class _GatherReorder(torch.autograd.Function):
    """`_reorder` as a gather whose backward is the inverse gather (autograd's index_select backward
    would scatter-add into zeros, and a permuted copy with bi <= 2 long runs is slower still)."""

    @staticmethod
    def forward(ctx, t, grid, to_blocks):
        ctx.grid, ctx.to_blocks, ctx.shape = grid, to_blocks, t.shape
        return t.reshape(-1).index_select(0, _reorder_index(grid, to_blocks, t.device))

    @staticmethod
    def backward(ctx, g):
        gt = g.reshape(-1).index_select(0, _reorder_index(ctx.grid, not ctx.to_blocks, g.device))
        return gt.view(ctx.shape), None, None


def _reorder(t: Tensor, grid: tuple[int, int, int, int], to_blocks: bool) -> Tensor:
    """Flat (m1, bo, n1, bi) <-> (m1, n1, bo, bi) order (W's rows-major order vs block-major order)."""
    m1, n1, bo, bi = grid
    if t.numel() <= _GATHER_MAX:
        return t.reshape(-1).index_select(0, _reorder_index(grid, to_blocks, t.device))
    if bi <= _GATHER_RUN and t.numel() <= _GATHER_MAX_SHORT_RUNS:
        return _GatherReorder.apply(t, grid, to_blocks)
    if to_blocks:
        return t.reshape(m1, bo, n1, bi).transpose(1, 2).reshape(-1)
    return t.reshape(m1, n1, bo, bi).transpose(1, 2).reshape(-1)


# --------------------------------------------------------------------------------------------
# The factored contractions (C = S * A is (r, m1, n1); activations are kept feature-major)
# --------------------------------------------------------------------------------------------
#
# Every contraction is one GEMM or one batched GEMM on views, with no permuted copy of an
# activation-sized tensor except gyᵀ (and xᵀ on factors_first): the intermediates are laid out
# feature-major, (features, N), so that an (i, q) or (p, i) contraction is a single GEMM and the
# results come out as yᵀ and xᵀ, returned as transposed views. Only factor-sized tensors (r*m1*n1
# or r*bo*bi elements) are ever permuted. One exception: a leaf input's gradient must be row-major
# (AccumulateGrad would copy a transposed one), so input_first then copies gx from (n1, N, bi),
# whose bi-long runs copy faster than the transpose.


def _rows_q_i(C: Tensor) -> Tensor:
    """C (r, m1, n1) -> (m1, n1*r), columns ordered (q, i)."""
    r, m1, n1 = C.shape
    return C.permute(1, 2, 0).reshape(m1, n1 * r)


def _rows_p_i(C: Tensor) -> Tensor:
    """C (r, m1, n1) -> (m1*r, n1), rows ordered (p, i)."""
    r, m1, n1 = C.shape
    return C.transpose(0, 1).reshape(m1 * r, n1)


def _cols_i_c(B: Tensor) -> Tensor:
    """B (r, bo, bi) -> (bo, r*bi), columns ordered (i, c)."""
    r, bo, bi = B.shape
    return B.transpose(0, 1).reshape(bo, r * bi)


def _input_first_z(x2: Tensor, B: Tensor, n1: int) -> Tensor:
    """Z[q, (i, a), n] = sum_c B[i, a, c] x[n, q, c]: (n1, r*bo, N), one batched GEMM on views."""
    r, bo, bi = B.shape
    Xq = x2.view(-1, n1, bi).permute(1, 2, 0)  # (n1, bi, N) view
    return torch.bmm(B.reshape(1, r * bo, bi).expand(n1, -1, -1), Xq)


def _input_first(x2: Tensor, C: Tensor, B: Tensor, bias: Tensor | None = None) -> Tensor:
    """yᵀ (out, N) by Z = X Bᵀ first, then one GEMM over (q, i); bias added in place."""
    r, m1, n1 = C.shape
    N, bo = x2.shape[0], B.shape[1]
    Z = _input_first_z(x2, B, n1).view(n1 * r, bo * N)
    return _add_bias_(torch.mm(_rows_q_i(C), Z).view(m1 * bo, N), bias)


def _add_bias_(yt: Tensor, bias: Tensor | None) -> Tensor:
    """yᵀ + bias[:, None], in place where the dtypes allow (no second activation-sized tensor)."""
    if bias is None:
        return yt
    if bias.dtype != yt.dtype:  # e.g. a bf16 yᵀ under autocast with an fp32 bias: promote as `+` does
        return yt + bias.unsqueeze(1)
    return yt.add_(bias.unsqueeze(1))


def _input_first_backward(x2, C, B, gyt, need_x, row_major_gx):
    """gyt = gyᵀ (out, N) contiguous. Returns gx (N, in) or None, gC (r, m1, n1), gB.

    gx comes out as a transposed view (what the GEMMs give; a following Linear or elementwise op
    takes it without a copy) unless row_major_gx (a leaf input, whose .grad must be row-major)."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    N = x2.shape[0]
    Cq = _rows_q_i(C)  # (m1, n1*r)
    Gt = gyt.view(m1, bo * N)
    Z = _input_first_z(x2, B, n1).view(n1 * r, bo * N)  # recomputed, never saved
    gC = torch.mm(Gt, Z.t()).view(m1, n1, r).permute(2, 0, 1)
    del Z
    gZ = torch.mm(Cq.t(), Gt).view(n1, r * bo, N)
    Xn = x2.view(N, n1, bi).transpose(0, 1)  # (n1, N, bi) view
    gB = torch.bmm(gZ, Xn).sum(0).view(r, bo, bi)
    gx = None
    if need_x and row_major_gx:  # (q, N, bi) from the batched GEMM, then one copy with bi-long runs
        Bq = B.reshape(1, r * bo, bi).expand(n1, -1, -1)
        gx = torch.bmm(gZ.transpose(1, 2), Bq).transpose(0, 1).reshape(N, n1 * bi)
    elif need_x:
        gx = torch.bmm(B.reshape(1, r * bo, bi).transpose(1, 2).expand(n1, -1, -1), gZ).view(n1 * bi, N).t()
    return gx, gC, gB


def _factors_first(x2: Tensor, C: Tensor, B: Tensor, bias: Tensor | None = None) -> Tensor:
    """yᵀ (out, N) by T = (S*A) X first (one GEMM on xᵀ), then a batched GEMM over (i, c)."""
    r, m1, n1 = C.shape
    N, (_, bo, bi) = x2.shape[0], B.shape
    T = torch.mm(_rows_p_i(C), x2.t().contiguous().view(n1, bi * N)).view(m1, r * bi, N)
    return _add_bias_(torch.bmm(_cols_i_c(B).unsqueeze(0).expand(m1, -1, -1), T).view(m1 * bo, N), bias)


def _factors_first_backward(x2, C, B, gyt, need_x, row_major_gx):
    """As `_input_first_backward`, for the factors-first order (gx always a transposed view)."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    N = x2.shape[0]
    Cp, Bc = _rows_p_i(C), _cols_i_c(B)  # (m1*r, n1), (bo, r*bi)
    Gt = gyt.view(m1, bo, N)
    Xt = x2.t().contiguous().view(n1, bi * N)
    T = torch.mm(Cp, Xt).view(m1, r * bi, N)  # recomputed, never saved
    gB = torch.bmm(Gt, T.transpose(1, 2)).sum(0).view(bo, r, bi).transpose(0, 1)
    del T
    gT = torch.bmm(Bc.t().unsqueeze(0).expand(m1, -1, -1), Gt).view(m1 * r, bi * N)
    gC = torch.mm(gT, Xt.t()).view(m1, r, n1).transpose(0, 1)
    gx = torch.mm(Cp.t(), gT).view(n1 * bi, N).t() if need_x else None
    return gx, gC, gB


_FORWARD = {"input_first": _input_first, "factors_first": _factors_first}
_BACKWARD = {"input_first": _input_first_backward, "factors_first": _factors_first_backward}


class _KronLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W = sum_i kron(S*A_i, B_i) by a factored path, saving only the inputs."""

    @staticmethod
    def forward(ctx, x2, S, A, B, bias, path, row_major_gx):  # x2: (N, in), contiguous
        ctx.path, ctx.row_major_gx = path, row_major_gx
        ctx.save_for_backward(x2, S, A, B)
        return _FORWARD[path](x2, S * A, B, bias).t()  # yᵀ (out, N) computed, y returned as a view

    @staticmethod
    def backward(ctx, gy):
        x2, S, A, B = ctx.saved_tensors
        gy = gy.to(x2.dtype)  # under autocast gy may be bf16 while the saved input is fp32
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        gbias = gy.sum(0) if need_b else None
        gx, gC, gB = _BACKWARD[ctx.path](x2, S * A, B, gy.t().contiguous(), need_x, ctx.row_major_gx)
        return gx, (gC * A).sum(0), gC * S, gB, gbias, None, None


def _kron_linear(x: Tensor, S: Tensor, A: Tensor, B: Tensor, bias: Tensor | None, path: str) -> Tensor:
    """`kron_linear` without validating the factors (a KronLinear's are valid by construction)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid paths: {', '.join(PATHS)}")
    m1, n1 = S.shape
    r, bo, bi = B.shape
    in_features = n1 * bi
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected {in_features}")
    if path == "auto":
        grad = torch.is_grad_enabled()
        training = grad and any(t is not None and t.requires_grad for t in (x, S, A, B, bias))
        tokens = x.numel() // in_features
        path = choose_path(in_features, m1 * bo, (bo, bi), r, tokens, training, grad and x.requires_grad)
    if path == "materialize":  # plain autograd: its backward is a few C++ nodes, no Python
        return torch.nn.functional.linear(x, _build_weight(S * A, B), bias)
    x2 = x.reshape(-1, in_features).contiguous()
    y = _KronLinearFn.apply(x2, S, A, B, bias, path, x.is_leaf)
    return y.reshape(*x.shape[:-1], m1 * bo)

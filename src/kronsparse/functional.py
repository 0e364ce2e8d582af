"""Pure tensor maths of kronsparse: Kronecker weights, block helpers, penalties, proximal maps.

Conventions (docs: METHOD.md §1). A weight W has nn.Linear's orientation (out, in). It is

    W = sum_i kron(S * A[i], B[i])      S: (m1, n1), A: (r, m1, n1), B: (r, bo, bi)

so W[p*bo + a, q*bi + c] = sum_i S[p, q] * A[i, p, q] * B[i, a, c], and block (p, q) of W, of
shape block_shape = (bo, bi), is zero when S[p, q] == 0.

`kron_linear` computes x Wᵀ + b by one of three paths (see `costs.choose_path`):

- "input_first":   Z_i = X B_iᵀ first (contracts the bi columns inside each block), then
                   Y = sum_i (S*A_i) Z_i. Intermediate (r, N, n1, bo).
- "factors_first": T_i = (S*A_i) X first (contracts the n1 block columns), then
                   Y = sum_i T_i B_iᵀ. Intermediate (r, N, m1, bi).
- "materialize":   build W once and do one dense matmul.

The factored paths run in a custom autograd function that saves only its inputs and recomputes
the r-times-larger intermediate in backward, so training memory stays close to a dense layer's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PATHS = ("auto", "input_first", "factors_first", "materialize")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def check_block_shape(out_features: int, in_features: int, block_shape) -> tuple[int, int]:
    """Validate that block_shape = (bo, bi) tiles an (out, in) weight; return it as a tuple."""
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer sizes must be positive, got out={out_features}, in={in_features}")
    try:
        bo, bi = (int(v) for v in block_shape)
    except (TypeError, ValueError):
        raise ValueError(f"block_shape must be a pair (bo, bi) of ints, got {block_shape!r}") from None
    if bo < 1 or bi < 1 or out_features % bo or in_features % bi:
        msg = (
            f"block_shape (bo, bi) = ({bo}, {bi}) does not tile a weight of shape (out, in) = "
            f"({out_features}, {in_features}): bo must divide out ({divisors(out_features)}) "
            f"and bi must divide in ({divisors(in_features)})"
        )
        if bi >= 1 and bo >= 1 and out_features % bi == 0 and in_features % bo == 0:
            msg += f"; the transposed shape ({bi}, {bo}) tiles it (block_shape is (out, in), nn.Linear's order)"
        raise ValueError(msg)
    return bo, bi


def _check_factors(S: Tensor, A: Tensor, B: Tensor) -> None:
    if S.dim() != 2 or A.dim() != 3 or B.dim() != 3:
        raise ValueError(
            f"expected S (m1, n1), A (r, m1, n1), B (r, bo, bi); got S {tuple(S.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if A.shape[1:] != S.shape or A.shape[0] != B.shape[0]:
        raise ValueError(
            f"factor shapes disagree: S {tuple(S.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)} "
            "(need A[i] of S's shape and as many B[i] as A[i])"
        )
    if not (S.dtype == A.dtype == B.dtype) or not (S.device == A.device == B.device):
        raise ValueError(
            f"S, A, B must share dtype and device; got {S.dtype}/{S.device}, {A.dtype}/{A.device}, "
            f"{B.dtype}/{B.device}"
        )


# --------------------------------------------------------------------------------------------
# The weight
# --------------------------------------------------------------------------------------------


def kron_weight(S: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """W (m1*bo, n1*bi) = sum_i kron(S * A[i], B[i])."""
    _check_factors(S, A, B)
    m1, n1 = S.shape
    _, bo, bi = B.shape
    W = torch.einsum("ipq,iac->paqc", S * A, B)  # (m1, bo, n1, bi)
    return W.reshape(m1 * bo, n1 * bi)


def _weight_grads(S: Tensor, A: Tensor, B: Tensor, gW: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of S, A, B from the gradient of the dense weight, gW (out, in)."""
    m1, n1 = S.shape
    r, bo, bi = B.shape
    G = gW.reshape(m1, bo, n1, bi).permute(0, 2, 1, 3).reshape(m1 * n1, bo * bi)
    C = (S * A).reshape(r, m1 * n1)
    gC = (B.reshape(r, bo * bi) @ G.t()).reshape(r, m1, n1)  # (r, m1, n1)
    gB = (C @ G).reshape(r, bo, bi)
    return (gC * A).sum(0), gC * S, gB


# --------------------------------------------------------------------------------------------
# The factored contractions (x is (N, n1, bi); C = S * A is (r, m1, n1))
# --------------------------------------------------------------------------------------------


def _input_first(X: Tensor, C: Tensor, B: Tensor) -> Tensor:
    Z = torch.einsum("nqc,iac->niqa", X, B)  # (N, r, n1, bo)
    return torch.einsum("ipq,niqa->npa", C, Z)  # (N, m1, bo)


def _factors_first(X: Tensor, C: Tensor, B: Tensor) -> Tensor:
    T = torch.einsum("ipq,nqc->nipc", C, X)  # (N, r, m1, bi)
    return torch.einsum("nipc,iac->npa", T, B)  # (N, m1, bo)


def _input_first_backward(X, C, B, G):
    """G = dL/dY (N, m1, bo). Returns dX, dC, dB; recomputes Z instead of having stored it."""
    Z = torch.einsum("nqc,iac->niqa", X, B)  # (N, r, n1, bo)
    gC = torch.einsum("npa,niqa->ipq", G, Z)
    del Z
    gZ = torch.einsum("ipq,npa->niqa", C, G)  # (N, r, n1, bo)
    gB = torch.einsum("niqa,nqc->iac", gZ, X)
    gX = torch.einsum("niqa,iac->nqc", gZ, B)
    return gX, gC, gB


def _factors_first_backward(X, C, B, G):
    T = torch.einsum("ipq,nqc->nipc", C, X)  # (N, r, m1, bi)
    gB = torch.einsum("npa,nipc->iac", G, T)
    del T
    gT = torch.einsum("npa,iac->nipc", G, B)  # (N, r, m1, bi)
    gC = torch.einsum("nipc,nqc->ipq", gT, X)
    gX = torch.einsum("nipc,ipq->nqc", gT, C)
    return gX, gC, gB


_FORWARD = {"input_first": _input_first, "factors_first": _factors_first}
_BACKWARD = {"input_first": _input_first_backward, "factors_first": _factors_first_backward}


class _KronLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W = sum_i kron(S*A_i, B_i); saves only the inputs."""

    @staticmethod
    def forward(ctx, x2, S, A, B, bias, path):  # x2: (N, in)
        m1, n1 = S.shape
        _, bo, bi = B.shape
        if path == "materialize":
            W = kron_weight(S, A, B)
            y = torch.addmm(bias, x2, W.t()) if bias is not None else x2 @ W.t()
            ctx.save_for_backward(x2, S, A, B, W)
        else:
            X = x2.reshape(-1, n1, bi)
            y = _FORWARD[path](X, S * A, B).reshape(-1, m1 * bo)
            if bias is not None:
                y = y + bias
            ctx.save_for_backward(x2, S, A, B)
        ctx.path, ctx.has_bias = path, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x2, S, A, B = ctx.saved_tensors[:4]
        m1, n1 = S.shape
        _, bo, bi = B.shape
        gbias = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[4] else None
        if ctx.path == "materialize":
            W = ctx.saved_tensors[4]
            gx = gy @ W if ctx.needs_input_grad[0] else None
            gS, gA, gB = _weight_grads(S, A, B, gy.t() @ x2)
            return gx, gS, gA, gB, gbias, None
        X, G = x2.reshape(-1, n1, bi), gy.reshape(-1, m1, bo)
        gX, gC, gB = _BACKWARD[ctx.path](X, S * A, B, G)
        gx = gX.reshape(x2.shape) if ctx.needs_input_grad[0] else None
        return gx, (gC * A).sum(0), gC * S, gB, gbias, None


def kron_linear(x: Tensor, S: Tensor, A: Tensor, B: Tensor, bias: Tensor | None = None,
                path: str = "auto") -> Tensor:
    """x Wᵀ + b for x of shape (..., in), W = kron_weight(S, A, B), computed by `path`.

    path: "auto" (cost model, see `costs.choose_path`), "input_first", "factors_first" or
    "materialize". All paths give the same result up to floating-point rounding.
    """
    _check_factors(S, A, B)
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid paths: {', '.join(PATHS)}")
    m1, n1 = S.shape
    r, bo, bi = B.shape
    in_features = n1 * bi
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features in its last dimension, expected {in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if path == "auto":
        from .costs import choose_path  # local import: costs imports this module's helpers

        path = choose_path(m1 * bo, in_features, (bo, bi), r, x2.shape[0])
    y = _KronLinearFn.apply(x2, S, A, B, bias, path)
    return y.reshape(*lead, m1 * bo)


# --------------------------------------------------------------------------------------------
# Blocks of a dense weight
# --------------------------------------------------------------------------------------------


def block_view(W: Tensor, block_shape) -> Tensor:
    """View W (out, in) as blocks (m1, n1, bo, bi): result[p, q] is block (p, q)."""
    bo, bi = check_block_shape(W.shape[0], W.shape[1], block_shape)
    m1, n1 = W.shape[0] // bo, W.shape[1] // bi
    return W.reshape(m1, bo, n1, bi).transpose(1, 2)


def block_norms(W: Tensor, block_shape) -> Tensor:
    """Frobenius norm of every block, shape (m1, n1)."""
    return torch.linalg.vector_norm(block_view(W, block_shape), dim=(-2, -1))


def block_mask_of(W: Tensor, block_shape) -> Tensor:
    """Bool (m1, n1): True where block (p, q) of W has any non-zero entry."""
    return block_view(W, block_shape).ne(0).any(dim=-1).any(dim=-1)


def expand_block_mask(mask: Tensor, block_shape) -> Tensor:
    """Block mask (m1, n1) -> element mask (m1*bo, n1*bi)."""
    bo, bi = block_shape
    return mask.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)


def block_sparsity(W: Tensor, block_shape) -> float:
    """Fraction of (bo, bi) blocks of W that are exactly zero."""
    return 1.0 - block_mask_of(W, block_shape).float().mean().item()


# --------------------------------------------------------------------------------------------
# Penalties and their proximal maps (applied explicitly after optimizer.step())
# --------------------------------------------------------------------------------------------


def l1_penalty(S: Tensor) -> Tensor:
    """||S||_1, the method's block-sparsity penalty."""
    return S.abs().sum()


def soft_threshold(x: Tensor, threshold: float) -> Tensor:
    """Proximal map of threshold * ||x||_1: sign(x) * max(|x| - threshold, 0)."""
    return torch.sign(x) * torch.clamp(x.abs() - threshold, min=0)


def group_lasso_penalty(W: Tensor, block_shape) -> Tensor:
    """sum over blocks g of sqrt(bo*bi) * ||W_g||_F."""
    bo, bi = block_shape
    return math.sqrt(bo * bi) * block_norms(W, block_shape).sum()


def group_shrink(W: Tensor, block_shape, threshold: float) -> Tensor:
    """Proximal map of threshold * sum_g ||W_g||_F: every block scaled by max(1 - t/||W_g||, 0)."""
    norms = block_norms(W, block_shape)
    scale = torch.clamp(1 - threshold / norms.clamp_min(torch.finfo(W.dtype).tiny), min=0)
    bo, bi = block_shape
    return W * expand_block_mask(scale, (bo, bi))


def group_norm_shrink(x: Tensor, threshold: float) -> Tensor:
    """Proximal map of threshold * ||x||_2 for one whole group x (pattern selection)."""
    norm = torch.linalg.vector_norm(x)
    if norm <= threshold:
        return torch.zeros_like(x)
    return x * (1 - threshold / norm)

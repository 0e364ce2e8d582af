"""The maths of kronsparse on plain tensors: the Kronecker weight, a readable reference of the
layer, the penalties and their proximal maps. The fast paths live in kernels.py, the block
geometry in blocks.py.

A weight W has nn.Linear's orientation (out, in). It is

    W = sum_i kron(S * A[i], B[i])      S: (m1, n1), A: (r, m1, n1), B: (r, bo, bi)

so W[p*bo + a, q*bi + c] = sum_i S[p, q] * A[i, p, q] * B[i, a, c], and block (p, q) of W, of
shape block_shape = (bo, bi), is zero when S[p, q] == 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .blocks import (  # noqa: F401  (re-exported: the block helpers were first written here)
    block_mask_of,
    block_norms,
    block_sparsity,
    block_view,
    check_block_shape,
    divisors,
    expand_block_mask,
)
from .kernels import _build_weight, _kron_linear


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
# The weight and the layer
# --------------------------------------------------------------------------------------------


def kron_weight(S: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """W (m1*bo, n1*bi) = sum_i kron(S * A[i], B[i])."""
    _check_factors(S, A, B)
    return _build_weight(S * A, B)


def kron_linear(x: Tensor, S: Tensor, A: Tensor, B: Tensor, bias: Tensor | None = None,
                path: str = "auto") -> Tensor:
    """x Wᵀ + b for x of shape (..., in), W = kron_weight(S, A, B), computed by `path`.

    path: "auto" (cost model, see `costs.choose_path`), "input_first", "factors_first" or
    "materialize". All paths give the same result up to floating-point rounding.
    """
    _check_factors(S, A, B)
    return _kron_linear(x, S, A, B, bias, path)


def kron_linear_reference(x: Tensor, S: Tensor, A: Tensor, B: Tensor, bias: Tensor | None = None) -> Tensor:
    """kron_linear written out in one einsum, the definition the fast paths are tested against:
    y[..., p*bo + a] = sum_{i, q, c} S[p, q] A[i, p, q] B[i, a, c] x[..., q*bi + c] + b."""
    _check_factors(S, A, B)
    (m1, n1), (_, bo, bi) = S.shape, B.shape
    X = x.reshape(*x.shape[:-1], n1, bi)
    y = torch.einsum("pq,ipq,iac,...qc->...pa", S, A, B, X).reshape(*x.shape[:-1], m1 * bo)
    return y if bias is None else y + bias


# --------------------------------------------------------------------------------------------
# Penalties and their proximal maps (applied explicitly after optimizer.step())
# --------------------------------------------------------------------------------------------


def soft_threshold(x: Tensor, threshold: float) -> Tensor:
    """Proximal map of threshold * ||x||_1: sign(x) * max(|x| - threshold, 0), in one kernel."""
    return torch.nn.functional.softshrink(x, threshold)


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

"""Modules over the functional core: KronLinear, a drop-in block-sparse nn.Linear."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import functional as F


class KronLinear(nn.Module):
    """nn.Linear whose weight is W = sum_i kron(S * A[i], B[i]), never trained densely.

    Args:
        in_features, out_features: as nn.Linear; W has shape (out_features, in_features).
        block_shape: (bo, bi), the shape of every block (and of every B[i]); bo divides
            out_features and bi divides in_features. The paper's MNIST "16x2" is (2, 16).
        rank: number r of Kronecker terms.
        path: how forward contracts ("auto" picks by the cost model per call).

    Parameters: S (m1, n1) block gates, shared by all terms; A (r, m1, n1); B (r, bo, bi);
    bias (out,) or None; m1 = out/bo, n1 = in/bi. S[p, q] == 0 zeroes block (p, q).
    """

    def __init__(self, in_features: int, out_features: int, block_shape, rank: int = 1, bias: bool = True,
                 device=None, dtype=None, path: str = "auto") -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if path not in F.PATHS:
            raise ValueError(f"unknown path {path!r}; valid paths: {', '.join(F.PATHS)}")
        bo, bi = F.check_block_shape(out_features, in_features, block_shape)
        self.in_features, self.out_features = in_features, out_features
        self.block_shape, self.rank, self.path = (bo, bi), rank, path
        m1, n1 = out_features // bo, in_features // bi
        kw = {"device": device, "dtype": dtype}
        self.S = nn.Parameter(torch.empty(m1, n1, **kw))
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, bo, bi, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(m1, n1): the number of block rows and block columns."""
        return tuple(self.S.shape)

    def reset_parameters(self) -> None:
        """S = 1; A, B normal with Var(W) = r*Var(A)*Var(B) = 1/(3*in), nn.Linear's default variance."""
        std = (1.0 / (3.0 * self.in_features * self.rank)) ** 0.25
        with torch.no_grad():
            self.S.fill_(1.0)
            self.A.normal_(0.0, std)
            self.B.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.kron_linear(x, self.S, self.A, self.B, self.bias, self.path)

    def dense_weight(self) -> Tensor:
        """W (out, in), differentiable; the test oracle and the export path."""
        return F.kron_weight(self.S, self.A, self.B)

    @torch.no_grad()
    def block_mask(self) -> Tensor:
        """Bool (m1, n1): True where the block of the dense weight is non-zero."""
        return F.block_mask_of(self.dense_weight(), self.block_shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_shape={self.block_shape}, rank={self.rank}, bias={self.bias is not None}")

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_shape, rank: int = 1) -> "KronLinear":
        """Nearest sum of `rank` Kronecker products to linear.weight (Van Loan–Pitsianis SVD).

        Exact when the weight is such a sum. S starts at 1, A and B share the singular values.
        """
        W = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, block_shape, rank, linear.bias is not None,
                    device=W.device, dtype=W.dtype)
        m1, n1 = layer.grid_shape
        bo, bi = layer.block_shape
        R = F.block_view(W, (bo, bi)).reshape(m1 * n1, bo * bi)  # rows: blocks, cols: within-block
        U, sig, Vh = torch.linalg.svd(R.double(), full_matrices=False)
        k = min(rank, sig.numel())
        root = sig[:k].sqrt()
        with torch.no_grad():
            layer.A.zero_()
            layer.B.zero_()
            layer.A[:k] = (U[:, :k] * root).t().reshape(k, m1, n1).to(W.dtype)
            layer.B[:k] = (Vh[:k].t() * root).t().reshape(k, bo, bi).to(W.dtype)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear holding the exact dense weight (with its exact zero blocks)."""
        W = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=W.device,
                           dtype=W.dtype)
        linear.weight.copy_(W)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear


@dataclass
class SwapReport:
    """What `swap_linear_` replaced, and what it left dense and why."""

    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def swap_linear_(model: nn.Module, block_shape, rank: int = 1, filter_fn=None) -> SwapReport:
    """Replace, in place, every nn.Linear that `block_shape` tiles by KronLinear.from_linear.

    filter_fn(name, module) -> bool may exclude layers. Returns a SwapReport.
    """
    report = SwapReport()
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if filter_fn is not None and not filter_fn(name, module):
            report.skipped[name] = "excluded by filter_fn"
            continue
        try:
            F.check_block_shape(module.out_features, module.in_features, block_shape)
        except ValueError as err:
            report.skipped[name] = str(err)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, KronLinear.from_linear(module, block_shape, rank))
        report.swapped.append(name)
    return report

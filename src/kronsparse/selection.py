"""KronSelectLinear: one Kronecker term per candidate block shape, to choose the block size in one run.

W = sum_k W_k with W_k = sum_i kron(S_k * A_k[i], B_k[i]) of block shape k (METHOD.md §4). Each
candidate is a bias-free KronLinear in `terms` (keyed "2x8" for block_shape (2, 8)); the bias is
shared. `remove` drops a candidate (its parameters and its compute are gone); `collapse` turns the
last one into a plain KronLinear holding the very same parameter objects, so an optimizer keeps
their state.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as F
from .layers import KronLinear

DEFAULT_CANDIDATES = ((2, 2), (2, 8), (2, 16))


def block_name(block_shape) -> str:
    """(2, 8) -> "2x8", in nn.Linear's (out, in) order like the CLI's --block."""
    return f"{block_shape[0]}x{block_shape[1]}"


def check_candidates(out_features: int, in_features: int, candidates) -> list[tuple[int, int]]:
    """Every candidate must tile the (out, in) weight; the error lists the valid sides."""
    shapes = []
    for c in candidates:
        try:
            shapes.append(F.check_block_shape(out_features, in_features, c))
        except ValueError as err:
            raise ValueError(f"candidate block shape {c!r} does not fit layer {in_features} -> {out_features}: "
                             f"{err}") from None
    if not shapes:
        raise ValueError("pattern selection needs at least one candidate block shape")
    if len(set(shapes)) != len(shapes):
        raise ValueError(f"candidate block shapes repeat: {[block_name(s) for s in shapes]}")
    return shapes


class KronSelectLinear(nn.Module):
    """nn.Linear whose weight is the sum of one Kronecker term per candidate block shape.

    Args:
        in_features, out_features: as nn.Linear; W has shape (out_features, in_features).
        candidates: block shapes (bo, bi), each tiling W.
        rank: Kronecker terms r of every candidate.

    Parameters: terms[name].S (m1_k, n1_k), .A (r, m1_k, n1_k), .B (r, bo_k, bi_k); bias (out,).
    """

    def __init__(self, in_features: int, out_features: int, candidates=DEFAULT_CANDIDATES, rank: int = 1,
                 bias: bool = True, device=None, dtype=None, path: str = "auto") -> None:
        super().__init__()
        shapes = check_candidates(out_features, in_features, candidates)
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.terms = nn.ModuleDict({block_name(s): KronLinear(in_features, out_features, s, rank, bias=False,
                                                              device=device, dtype=dtype, path=path)
                                    for s in shapes})
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    @property
    def candidates(self) -> dict[str, tuple[int, int]]:
        """The surviving candidates, name -> block shape."""
        return {name: term.block_shape for name, term in self.terms.items()}

    def reset_parameters(self) -> None:
        """Each term as KronLinear's init, A and B scaled by K^(-1/4): the sum has nn.Linear's variance."""
        scale = len(self.terms) ** -0.25
        with torch.no_grad():
            for term in self.terms.values():
                term.reset_parameters()
                term.A.mul_(scale)
                term.B.mul_(scale)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        y = None
        for term in self.terms.values():
            bias = self.bias if y is None else None
            out = F.kron_linear(x, term.S, term.A, term.B, bias, term.path)
            y = out if y is None else y + out
        return y

    def dense_weight(self) -> Tensor:
        """W (out, in) = sum_k W_k, differentiable."""
        return sum(term.dense_weight() for term in self.terms.values())

    @property
    def weight(self) -> Tensor:
        """The dense weight, for code that reads nn.Linear.weight (models.layer_weight)."""
        return self.dense_weight()

    @torch.no_grad()
    def group_norms(self) -> dict[str, float]:
        """||S_k||_2 of every surviving candidate (the group g_k = S_k of METHOD.md §4)."""
        return {name: torch.linalg.vector_norm(term.S).item() for name, term in self.terms.items()}

    def remove(self, name: str) -> None:
        """Drop candidate `name`: its parameters leave the module."""
        if name not in self.terms:
            raise KeyError(f"no candidate {name!r}; surviving: {', '.join(self.terms)}")
        del self.terms[name]

    def collapse(self, name: str) -> KronLinear:
        """Candidate `name` as a KronLinear with the shared bias, taken out of this layer.

        It holds the same Parameter objects (not copies), so its dense weight is exactly the term's
        and an optimizer keeps their state. This layer should be replaced by it.
        """
        term = self.terms.pop(name)
        term.bias = self.bias  # KronLinear(bias=False) stores None; a Parameter registers
        return term

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"candidates=[{', '.join(self.terms)}], rank={self.rank}, bias={self.bias is not None}")

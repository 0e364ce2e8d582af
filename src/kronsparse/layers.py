"""Modules over the functional core: KronLinear, a drop-in block-sparse nn.Linear, KronConv2d, and
KronSelectLinear, one Kronecker term per candidate block shape for choosing the block size in one run
(W = sum_k W_k; `remove` drops a candidate, `collapse` turns the last one into a KronLinear holding
the very same parameter objects, so an optimizer keeps their state)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import functional as F
from .blocks import block_name, matrix_view
from .kernels import PATHS, _kron_linear
from .lazy_weight import LazyWeight


def full_rank(grid: tuple[int, int], b_shape: tuple) -> int:
    """The largest useful rank: W rearranged block by block is an (m1*n1, bo*bi[*kh*kw]) matrix, and
    no sum of more Kronecker products than its rank adds anything."""
    return min(grid[0] * grid[1], math.prod(b_shape))


def _check_rank(rank: int) -> None:
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")


def _make_factors(layer: nn.Module, grid: tuple[int, int], b_shape: tuple, out: int, bias: bool,
                  kw: dict) -> None:
    """The parameters of a Kron layer: S (m1, n1), A (r, m1, n1), B (r, *b_shape), bias (out,) or None."""
    layer.S = nn.Parameter(torch.empty(*grid, **kw))
    layer.A = nn.Parameter(torch.empty(layer.rank, *grid, **kw))
    layer.B = nn.Parameter(torch.empty(layer.rank, *b_shape, **kw))
    layer.bias = nn.Parameter(torch.empty(out, **kw)) if bias else None


@torch.no_grad()
def _reset_factors(layer: nn.Module, fan_in: int) -> None:
    """S = 1; A, B normal with r*Var(A)*Var(B) = 1/(3*fan_in), PyTorch's default weight variance;
    bias uniform in +-1/sqrt(fan_in), as nn.Linear and nn.Conv2d."""
    std = (1.0 / (3.0 * fan_in * layer.rank)) ** 0.25
    layer.S.fill_(1.0)
    layer.A.normal_(0.0, std)
    layer.B.normal_(0.0, std)
    if layer.bias is not None:
        bound = 1.0 / math.sqrt(fan_in)
        layer.bias.uniform_(-bound, bound)


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
        if path not in PATHS:
            raise ValueError(f"unknown path {path!r}; valid paths: {', '.join(PATHS)}")
        bo, bi = F.check_block_shape(out_features, in_features, block_shape)
        _check_rank(rank)
        self.in_features, self.out_features = in_features, out_features
        self.block_shape, self.rank, self.path = (bo, bi), rank, path
        _make_factors(self, (out_features // bo, in_features // bi), (bo, bi), out_features, bias,
                      {"device": device, "dtype": dtype})
        self.reset_parameters()

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(m1, n1): the number of block rows and block columns."""
        return tuple(self.S.shape)

    def reset_parameters(self) -> None:
        """S = 1; A, B normal with Var(W) = r*Var(A)*Var(B) = 1/(3*in), nn.Linear's default variance."""
        _reset_factors(self, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return _kron_linear(x, self.S, self.A, self.B, self.bias, self.path)

    def dense_weight(self) -> Tensor:
        """W (out, in), differentiable; the test oracle and the export path."""
        return F.kron_weight(self.S, self.A, self.B)

    @property
    def weight(self) -> LazyWeight:
        """For model code that reads nn.Linear.weight (its dtype, device, shape): W, built only when used."""
        return LazyWeight(self, (self.out_features, self.in_features))

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


INITS = ("svd", "fresh")


def kron_like(module: nn.Module, block_shape, rank: int = 1, init: str = "svd", path: str = "auto") -> nn.Module:
    """The Kronecker layer (KronLinear or KronConv2d) for a dense nn.Linear or nn.Conv2d.

    init="svd": the nearest Kronecker sum of its weight (converting a trained layer: same function
    as far as rank allows). init="fresh": the Kronecker layer's own initialisation, scaled so W has
    the dense weight's variance (training from scratch: the dense layer's init, e.g. a transformer's
    std 0.02, is kept in distribution; an SVD of a random matrix keeps only part of its variance).
    The bias is copied either way. A rank above the layer's full Kronecker rank (layers.full_rank)
    is capped there: no higher rank adds anything (the caller can compare `.rank` to say so)."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")
    if isinstance(module, nn.Conv2d):
        b_shape = (*F.check_block_shape(module.out_channels, module.in_channels, block_shape), *module.kernel_size)
        grid = (module.out_channels // b_shape[0], module.in_channels // b_shape[1])
        layer = KronConv2d.from_conv2d(module, block_shape, min(rank, full_rank(grid, b_shape)))
    else:
        bo, bi = F.check_block_shape(module.out_features, module.in_features, block_shape)
        grid = (module.out_features // bo, module.in_features // bi)
        layer = KronLinear.from_linear(module, block_shape, min(rank, full_rank(grid, (bo, bi))))
        layer.path = path
    if init == "fresh":
        with torch.no_grad():
            layer.reset_parameters()
            if module.bias is not None:
                layer.bias.copy_(module.bias)
            ratio = float(module.weight.detach().float().std() / layer.dense_weight().float().std())
            if math.isfinite(ratio) and ratio > 0:
                layer.A.mul_(math.sqrt(ratio))
                layer.B.mul_(math.sqrt(ratio))
    return layer


def swap_linear_(model: nn.Module, block_shape, rank: int = 1, filter_fn=None, init: str = "svd") -> SwapReport:
    """Replace, in place, every nn.Linear that `block_shape` tiles by its KronLinear (see kron_like
    for `init`: "svd" to convert a trained model, "fresh" to train from scratch).

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
        setattr(parent, child, kron_like(module, block_shape, rank, init))
        report.swapped.append(name)
    return report


class KronConv2d(nn.Module):
    """nn.Conv2d whose weight is a Kronecker sum over (out, in) channel blocks, the kernel kept whole.

    W[p*bo + a, q*bi + c, y, x] = sum_i S[p, q] * A[i, p, q] * B[i, a, c, y, x]

    Args:
        in_channels, out_channels, kernel_size, stride, padding, bias: as nn.Conv2d (no groups).
        block_shape: (bo, bi) over (out_channels, in_channels); bo divides out, bi divides in.
        rank: number r of Kronecker terms.

    Parameters: S (m1, n1), A (r, m1, n1), B (r, bo, bi, kh, kw), bias (out,) or None.
    Layout: viewed as nn.Conv2d's im2col matrix W.flatten(1), shape (out, in*kh*kw), this is
    exactly KronLinear's weight with blocks (bo, bi*kh*kw), so the functional core serves both.
    Forward materialises W (r*out*in*kh*kw multiply-adds once per call) and runs one dense conv:
    the weight of a conv layer is tiny next to its activations, so the build is negligible.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, block_shape, rank: int = 1,
                 stride=1, padding=0, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        bo, bi = F.check_block_shape(out_channels, in_channels, block_shape)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        _check_rank(rank)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding = stride, padding
        self.block_shape, self.rank = (bo, bi), rank
        _make_factors(self, (out_channels // bo, in_channels // bi), (bo, bi, kh, kw), out_channels, bias,
                      {"device": device, "dtype": dtype})
        self.reset_parameters()

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.S.shape)

    def reset_parameters(self) -> None:
        """S = 1; Var(W) = 1/(3*fan_in), nn.Conv2d's default variance (fan_in = in*kh*kw)."""
        _reset_factors(self, self.in_channels * self.kernel_size[0] * self.kernel_size[1])

    def dense_weight(self) -> Tensor:
        """W (out, in, kh, kw), differentiable."""
        r, bo, bi, kh, kw = self.B.shape
        W = F.kron_weight(self.S, self.A, self.B.reshape(r, bo, bi * kh * kw))  # (out, in*kh*kw)
        return W.view(self.out_channels, self.in_channels, kh, kw)

    @property
    def weight(self) -> LazyWeight:
        """For model code that reads nn.Conv2d.weight (its dtype, device, shape): W, built only when used."""
        return LazyWeight(self, (self.out_channels, self.in_channels, *self.kernel_size))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.conv2d(x, self.dense_weight(), self.bias, self.stride, self.padding)

    @torch.no_grad()
    def block_mask(self) -> Tensor:
        """Bool (m1, n1): True where channel block (p, q) of the dense weight is non-zero."""
        return F.block_mask_of(*matrix_view(self.dense_weight(), self.block_shape))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, block_shape={self.block_shape}, "
                f"rank={self.rank}, bias={self.bias is not None}")

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d, block_shape, rank: int = 1) -> "KronConv2d":
        """Nearest Kronecker sum to conv.weight (SVD of the rearranged im2col matrix)."""
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("KronConv2d.from_conv2d supports groups=1, dilation=1, zero padding only")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, block_shape, rank, conv.stride,
                    conv.padding, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        W2, (bo, bik) = matrix_view(conv.weight.detach(), layer.block_shape)
        lin = nn.Linear(W2.shape[1], W2.shape[0], bias=conv.bias is not None, dtype=W2.dtype, device=W2.device)
        with torch.no_grad():
            lin.weight.copy_(W2)
            if conv.bias is not None:
                lin.bias.copy_(conv.bias)
            kron = KronLinear.from_linear(lin, (bo, bik), rank)
            layer.A.copy_(kron.A)
            layer.B.copy_(kron.B.view_as(layer.B))
            if conv.bias is not None:
                layer.bias.copy_(kron.bias)
        return layer

    @torch.no_grad()
    def to_conv2d(self) -> nn.Conv2d:
        """A plain nn.Conv2d holding the exact dense weight."""
        W = self.dense_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         bias=self.bias is not None, device=W.device, dtype=W.dtype)
        conv.weight.copy_(W)
        if self.bias is not None:
            conv.bias.copy_(self.bias)
        return conv


# --------------------------------------------------------------------------------------------
# Pattern selection: one Kronecker term per candidate block shape
# --------------------------------------------------------------------------------------------

DEFAULT_CANDIDATES = ((2, 2), (2, 8), (2, 16))


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


KRON_LAYERS = (KronLinear, KronConv2d)  # the layers the kron method steers (they expose S, A, B, block_shape)


def kron_dense(layer: nn.Module) -> nn.Module:
    """The plain PyTorch layer of a Kron layer (nn.Linear or nn.Conv2d); other modules as they are."""
    if isinstance(layer, KronLinear):
        return layer.to_linear()
    if isinstance(layer, KronConv2d):
        return layer.to_conv2d()
    return layer

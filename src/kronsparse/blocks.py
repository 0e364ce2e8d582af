"""Block geometry of a weight: which block shapes tile it, its blocks as a view, their norms and masks.

A weight W has nn.Linear's orientation (out, in); block_shape = (bo, bi) tiles it into an
(m1, n1) = (out/bo, in/bi) grid. A conv weight (out, in, kh, kw) is tiled by (bo, bi) channel
blocks, the kernel whole: its matrix view (out, in*kh*kw) in (bo, bi*kh*kw) blocks. The leaf of
the package: it imports nothing of kronsparse.
"""

from __future__ import annotations

import math

from torch import Tensor


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending, in O(sqrt(n)) steps (n = 10**18 takes a second)."""
    if n < 1:
        return []
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def block_name(block_shape) -> str:
    """(2, 16) -> "2x16", in nn.Linear's (out, in) order like the CLI's --block."""
    return f"{block_shape[0]}x{block_shape[1]}"


def paper_block_name(block_shape) -> str:
    """(2, 16) -> "16x2": the paper names a block (in x out)."""
    return f"{block_shape[1]}x{block_shape[0]}"


def parse_block(text: str) -> tuple[int, int]:
    """'2x16' -> (2, 16): OUTxIN in nn.Linear's (out, in) order (the paper's "16x2")."""
    try:
        bo, bi = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"block shape must look like OUTxIN, e.g. 2x16, got {text!r}") from None
    if bo < 1 or bi < 1:
        raise ValueError(f"block shape sides must be positive, got {text!r}")
    return bo, bi


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


def tiles(in_features: int, out_features: int, block_shape) -> bool:
    """True when block_shape = (bo, bi) tiles an (out, in) weight."""
    try:
        check_block_shape(out_features, in_features, block_shape)
    except ValueError:
        return False
    return True


def matrix_view(W: Tensor, block_shape) -> tuple[Tensor, tuple[int, int]]:
    """A weight as a matrix and its block shape: (out, in, kh, kw) in (bo, bi) channel blocks is
    (out, in*kh*kw) in (bo, bi*kh*kw) blocks; a matrix is returned as it is."""
    bo, bi = block_shape
    if W.dim() == 2:
        return W, (bo, bi)
    return W.flatten(1), (bo, bi * math.prod(W.shape[2:]))


def block_view(W: Tensor, block_shape) -> Tensor:
    """View W (out, in) as blocks (m1, n1, bo, bi): result[p, q] is block (p, q)."""
    bo, bi = check_block_shape(W.shape[0], W.shape[1], block_shape)
    m1, n1 = W.shape[0] // bo, W.shape[1] // bi
    return W.reshape(m1, bo, n1, bi).transpose(1, 2)


def block_norms(W: Tensor, block_shape) -> Tensor:
    """Frobenius norm of every block, shape (m1, n1) (a reduction over a view, no strided copy)."""
    bo, bi = check_block_shape(W.shape[0], W.shape[1], block_shape)
    return W.reshape(W.shape[0] // bo, bo, W.shape[1] // bi, bi).square().sum(dim=(1, 3)).sqrt()


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

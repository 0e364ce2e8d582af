"""The fast paths of `kron_linear`: what runs, not what it means (that is functional.py).

Three ways to compute x Wᵀ + b for W = sum_i kron(S * A[i], B[i]) (costs.choose_path picks one):

- "input_first":   Z_i = X B_iᵀ first (contracts the bi columns inside each block), then
                   Y = sum_i (S*A_i) Z_i. Intermediate (r, N, n1, bo).
- "factors_first": T_i = (S*A_i) X first (contracts the n1 block columns), then
                   Y = sum_i T_i B_iᵀ. Intermediate (r, N, m1, bi).
- "materialize":   build W once and do one dense matmul (plain autograd: on small layers its
                   backward, a few C++ nodes, beats a Python one).

The factored paths run in a custom autograd function that saves only its inputs and recomputes the
r-times-larger intermediate in backward, a chunk of rows at a time (costs.chunk_rows), so that no
weight-sized tensor ever exists: their peak training memory is below dense nn.Linear's
(costs.train_peak_bytes; tests/test_memory.py). Every path is tested against functional's reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .costs import choose_path, chunk_rows
from .memo import memoised

PATHS = ("auto", "input_first", "factors_first", "materialize")


def _build_weight(C: Tensor, B: Tensor) -> Tensor:
    """W from C = S*A: one rank-r GEMM into (m1, n1, bo, bi) block-major order, then one reordering
    (small blocks on CPU: the same sums without the GEMM, `_ProductSum`)."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    zero_start = _product_sum_start(C, B)
    if zero_start is not None:
        return _ProductSum.apply(C, B, zero_start)
    M = torch.mm(C.reshape(r, m1 * n1).t(), B.reshape(r, bo * bi))  # (m1*n1, bo*bi)
    return _reorder(M, (m1, n1, bo, bi), to_blocks=False).view(m1 * bo, n1 * bi)


# --------------------------------------------------------------------------------------------
# W of small blocks without the GEMM
# --------------------------------------------------------------------------------------------
#
# With bo*bi <= 4 the GEMM above is a tall, 4-wide product with r terms per entry, which the CPU
# BLAS does slowly (MLP 784->300 at 2x2, rank 2: 275 us for 235,200 entries) and, measured, as a
# plain sum of rounded products. The same products summed by r broadcast multiplies over the long
# (m1, n1) axis take a quarter of that, but they must give the same bits as the GEMM, or training
# would move (every committed result was trained with the GEMM). So the first use of each shape,
# dtype and device compares both, bit for bit, on random factors with zero blocks of either sign,
# and the broadcast sum is used only where they agree (`_product_sum_start`); backward is the
# GEMM's own (the same two GEMMs autograd runs for it), so the gradients are unchanged too.
_PRODUCT_SUM_MAX = 4  # bo*bi up to this; above it the BLAS's GEMM is fast (and fused, so it differs)
_PRODUCT_SUM_MIN = 1 << 16  # W's entries from this many: below, the Python Function costs more than it saves
_PRODUCT_SUM = True


def _product_sum(C: Tensor, B: Tensor, zero_start: bool) -> Tensor:
    """sum_i C[i] (x) B[i] as W (m1*bo, n1*bi): the products in (bo, bi, m1, n1) order (each B[i, a, c]
    times the contiguous C[i]), summed in order i = 0, 1, ... (from +0.0 if `zero_start`: the sign a
    zero sum takes), then moved to W's order."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    acc = B[0].reshape(bo, bi, 1, 1) * C[0]
    for i in range(1, r):
        acc.add_(B[i].reshape(bo, bi, 1, 1) * C[i])
    if zero_start:
        acc.add_(0.0)
    return acc.permute(2, 0, 3, 1).reshape(m1 * bo, n1 * bi)


def _gemm_weight(C: Tensor, B: Tensor) -> Tensor:
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    M = torch.mm(C.reshape(r, m1 * n1).t(), B.reshape(r, bo * bi))
    return _strided_reorder(M, (m1, n1, bo, bi), to_blocks=False).view(m1 * bo, n1 * bi)


def _bits(t: Tensor) -> Tensor:
    return t.contiguous().view(_WORDS[t.element_size()])


@memoised(maxsize=64)
def _product_sum_agrees(shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device) -> bool | None:
    """None if `_product_sum` never gives the GEMM's bits at this shape (r, m1, n1, bo, bi), else the
    zero_start that does, checked on random factors with zeros of both signs in whole blocks."""
    r, m1, n1, bo, bi = shape
    g = torch.Generator().manual_seed(0)
    C = torch.randn(r, m1, n1, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    B = torch.randn(r, bo, bi, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    C[:, ::3] = 0.0  # pruned blocks: +0 and -0 products, and sums of them
    C[:, 1::6] = -0.0
    B[0, 0, 0] = -B[0, 0, 0].abs()
    reference = _bits(_gemm_weight(C, B))
    for zero_start in (False, True):
        if torch.equal(_bits(_product_sum(C, B, zero_start)), reference):
            return zero_start
    return None


def _product_sum_start(C: Tensor, B: Tensor) -> bool | None:
    """The zero_start for `_ProductSum` where it gives the GEMM's bits for these factors, else None."""
    r, bo, bi = B.shape
    if (bo * bi > _PRODUCT_SUM_MAX or C[0].numel() * bo * bi < _PRODUCT_SUM_MIN or not _PRODUCT_SUM
            or C.device.type != "cpu" or C.dtype != B.dtype
            or C.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()):
        return None
    return _product_sum_agrees((r, *C.shape[1:], bo, bi), C.dtype, C.device)


class _ProductSum(torch.autograd.Function):
    """W = `_product_sum(C, B)`; backward exactly as autograd's for the GEMM and reordering it replaces."""

    @staticmethod
    def forward(ctx, C, B, zero_start):
        ctx.save_for_backward(C, B)
        return _product_sum(C, B, zero_start)

    @staticmethod
    def backward(ctx, gW):
        C, B = ctx.saved_tensors
        r, m1, n1 = C.shape
        _, bo, bi = B.shape
        gM = _reorder(gW.contiguous(), (m1, n1, bo, bi), to_blocks=True).view(m1 * n1, bo * bi)
        mat1, mat2 = C.reshape(r, m1 * n1).t(), B.reshape(r, bo * bi)  # what the GEMM multiplied
        gC = gB = None
        if ctx.needs_input_grad[0]:  # mat1 is column-major: autograd's mm backward takes this form
            gC = torch.mm(mat2, gM.t()).view(r, m1, n1)
        if ctx.needs_input_grad[1]:
            column_major = mat2.stride(0) == 1 and mat2.stride(1) == mat2.size(0)
            gB = (torch.mm(gM.t(), mat1).t() if column_major else torch.mm(mat1.t(), gM)).reshape(r, bo, bi)
        return gC, gB, None


# Below this many elements the block reordering is a gather with a cached index: a strided copy
# whose inner run is bi (often 2) elements long costs 2-5x more there; above it, the copy wins,
# except for runs of bi <= 2 up to a million elements (MLP 784->300 at 2x2: a whole training step
# 0.55 ms faster, 7.5%), where a gather with a gather as its backward is used.
_GATHER_MAX = 1 << 16
_GATHER_RUN, _GATHER_MAX_SHORT_RUNS = 2, 1 << 20
# Above _GATHER_MAX, before both: where a run of bi elements is 1, 2, 4 or 8 bytes, it moves as one
# integer word (`_word_transpose`): W of the MLP's 784->300 layer at 2x2 (float32) in 47 us against
# the gather's 80 us and the strided copy's 780 us (1 thread, the 2-core VM of docs/performance.md,
# each alone). Below it the gather stays: its autograd is C++, and a Python Function's overhead
# (tens of us a call) would cost more than the copy saves.
_WORD_REORDER = True


@memoised(maxsize=64)
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


# A run of bi elements of this many bytes moves as one machine word (bi = 2 in float32: an int64)
_WORDS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _word_dtype(t: Tensor, bi: int) -> torch.dtype | None:
    """The integer dtype one run of bi elements of t fits exactly, if t can be viewed so (None if not)."""
    word = _WORDS.get(bi * t.element_size())
    if word is None or t.is_complex() or not t.is_contiguous() or t.data_ptr() % (bi * t.element_size()):
        return None
    return word


def _word_transpose(t: Tensor, grid: tuple[int, int, int, int], to_blocks: bool, word: torch.dtype) -> Tensor:
    """`_reorder` with each run of bi elements viewed as one integer word: a plain transpose of
    (m1, n1, bo) <-> (m1, bo, n1) words, exact (only bits move) and vectorised, where the gather or a
    strided copy moves bi (often 2) elements at a time."""
    m1, n1, bo, bi = grid
    words = t.reshape(-1).view(word)
    moved = (words.view(m1, bo, n1) if to_blocks else words.view(m1, n1, bo)).transpose(1, 2).contiguous()
    return moved.reshape(-1).view(t.dtype)  # flat first: a size-1 last dim may keep a stride other than 1


class _WordReorder(torch.autograd.Function):
    """`_word_transpose` whose backward is the inverse transpose (an integer view is not differentiable)."""

    @staticmethod
    def forward(ctx, t, grid, to_blocks, word):
        ctx.grid, ctx.to_blocks, ctx.word, ctx.shape = grid, to_blocks, word, t.shape
        return _word_transpose(t, grid, to_blocks, word)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        if _word_dtype(g, ctx.grid[3]) is None:  # an unaligned gradient: the strided copy
            return _strided_reorder(g, ctx.grid, not ctx.to_blocks).view(ctx.shape), None, None, None
        # through apply, not _word_transpose: so a double backward (create_graph) differentiates it too
        return _WordReorder.apply(g, ctx.grid, not ctx.to_blocks, ctx.word).view(ctx.shape), None, None, None


def _strided_reorder(t: Tensor, grid: tuple[int, int, int, int], to_blocks: bool) -> Tensor:
    m1, n1, bo, bi = grid
    if to_blocks:
        return t.reshape(m1, bo, n1, bi).transpose(1, 2).reshape(-1)
    return t.reshape(m1, n1, bo, bi).transpose(1, 2).reshape(-1)


def _reorder(t: Tensor, grid: tuple[int, int, int, int], to_blocks: bool) -> Tensor:
    """Flat (m1, bo, n1, bi) <-> (m1, n1, bo, bi) order (W's rows-major order vs block-major order)."""
    m1, n1, bo, bi = grid
    if t.numel() <= _GATHER_MAX:
        return t.reshape(-1).index_select(0, _reorder_index(grid, to_blocks, t.device))
    word = _word_dtype(t, bi) if _WORD_REORDER and not torch.compiler.is_compiling() else None  # traced: no data_ptr
    if word is not None:
        return _WordReorder.apply(t, grid, to_blocks, word)
    if bi <= _GATHER_RUN and t.numel() <= _GATHER_MAX_SHORT_RUNS:
        return _GatherReorder.apply(t, grid, to_blocks)
    return _strided_reorder(t, grid, to_blocks)


# --------------------------------------------------------------------------------------------
# The factored contractions (C = S * A is (r, m1, n1); activations are kept feature-major)
# --------------------------------------------------------------------------------------------
#
# Every contraction is one GEMM or one batched GEMM on views: the intermediates are laid out
# feature-major, (features, rows), so that an (i, q) or (p, i) contraction is a single GEMM. Only
# factor-sized tensors (r*m1*n1 or r*bo*bi elements) are ever permuted. Rows are processed in
# chunks of `costs.chunk_rows` rows, so the intermediates (Z or T, their gradients and a chunk of
# gyᵀ) never exceed half of a dense weight, however large the batch: peak training memory stays
# below dense nn.Linear's (which holds a weight-sized gradient). Outputs are written in place: y
# and gx are row-major (N, features) tensors that the GEMMs write into through strided views (BLAS
# takes a leading dimension, so no transposed copy is made). y is row-major even when the rows fit
# one chunk (one copy of yᵀ): returned as yᵀ's transposed view, it made the attention after a q/k/v
# projection leave SDPA's flash kernel for the math one, which holds the T×T score matrices.


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


def _chunks(N: int, rows: int) -> list[tuple[int, int]]:
    """[start, end) row ranges of equal size (the last one shorter) covering N rows."""
    n = max(1, -(-N // rows))
    size = -(-N // n)
    return [(s, min(s + size, N)) for s in range(0, N, size)]


def _input_first_z(xc: Tensor, B: Tensor, n1: int) -> Tensor:
    """Z[q, (i, a), n] = sum_c B[i, a, c] x[n, q, c]: (n1, r*bo, Nc), one batched GEMM on views."""
    r, bo, bi = B.shape
    Xq = xc.unflatten(1, (n1, bi)).permute(1, 2, 0)  # (n1, bi, Nc) view, of a row-major or transposed chunk
    return torch.bmm(B.reshape(1, r * bo, bi).expand(n1, -1, -1), Xq)


def _factors_first_t(xc: Tensor, Cp: Tensor, n1: int) -> tuple[Tensor, Tensor]:
    """xᵀ of the chunk (n1, bi*Nc) (the one copy of the input) and T = (S*A) xᵀ (m1*r, bi*Nc)."""
    Xt = xc.t().contiguous().view(n1, -1)
    return Xt, torch.mm(Cp, Xt)


def _forward(x2: Tensor, C: Tensor, B: Tensor, bias: Tensor | None, path: str, rows: int,
             shape: tuple[int, ...]) -> Tensor:
    """y, row-major and shaped `shape` (the input's leading dimensions, out), of either factored
    path, chunk by chunk; bias added in place. y is allocated in its final shape, so the Function
    returns a tensor of its own, never a view: autograd forbids in-place changes (an inplace ReLU
    after the layer) on a view made inside a custom Function, and under FSDP2 an in-place op on an
    output view dropped the hook that gathers the parameters for the backward (a segfault)."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    N, out = x2.shape[0], m1 * bo
    chunks, y = _chunks(N, rows), None
    for s, e in chunks:
        xc = x2[s:e]
        if path == "input_first":
            Z = _input_first_z(xc, B, n1).view(n1 * r, bo * (e - s))
            yt = torch.mm(_rows_q_i(C), Z).view(out, e - s)
            del Z
        else:
            T = _factors_first_t(xc, _rows_p_i(C), n1)[1].view(m1, r * bi, e - s)
            yt = torch.bmm(_cols_i_c(B).unsqueeze(0).expand(m1, -1, -1), T).view(out, e - s)
            del T
        if y is None:  # yt's dtype: under autocast the GEMMs run in bf16
            y = yt.new_empty(shape)
        y.view(N, out)[s:e].t().copy_(yt)
        del yt
    if bias is None:
        return y
    if bias.dtype != y.dtype:  # e.g. a bf16 y under autocast with an fp32 bias: promote as `+` does
        return y + bias
    return y.add_(bias)  # in place: no second activation-sized tensor


def _bmm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b batched, out a strided view: written in place (BLAS takes its leading dimension);
    under torch.compile, which refuses a non-contiguous out=, computed and copied."""
    if torch.compiler.is_compiling():
        out.copy_(torch.bmm(a, b))
    else:
        torch.bmm(a, b, out=out)


def _input_first_backward(x2, C, B, gy, need_x, rows):
    """gy (N, out) any layout. Returns gx (N, in) row-major or None, gC (r, m1, n1), gB (r, bo, bi)."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    N = x2.shape[0]
    Cq, Bq = _rows_q_i(C), B.reshape(1, r * bo, bi).expand(n1, -1, -1)  # (m1, n1*r), (n1, r*bo, bi)
    gCq, gB = C.new_zeros(m1, n1 * r), B.new_zeros(n1, r * bo, bi)
    gx = x2.new_empty(N, n1 * bi) if need_x else None
    for s, e in _chunks(N, rows):
        n, xc = e - s, x2[s:e]
        Gt = gy[s:e].t().contiguous().view(m1, bo * n)  # gyᵀ of the chunk, (a, n) merged
        Z = _input_first_z(xc, B, n1).view(n1 * r, bo * n)  # recomputed, never saved
        gCq.addmm_(Gt, Z.t())
        del Z
        gZ = torch.mm(Cq.t(), Gt).view(n1, r * bo, n)
        del Gt
        gB.baddbmm_(gZ, xc.unflatten(1, (n1, bi)).transpose(0, 1))  # (n1, r*bo, bi), summed over q below
        if need_x:  # written straight into the rows of gx through a strided view
            _bmm_into(gZ.transpose(1, 2), Bq, gx[s:e].view(n, n1, bi).transpose(0, 1))
        del gZ
    return gx, gCq.view(m1, n1, r).permute(2, 0, 1), gB.sum(0).view(r, bo, bi)


def _factors_first_backward(x2, C, B, gy, need_x, rows):
    """As `_input_first_backward`, for the factors-first order (gy read through a strided view)."""
    r, m1, n1 = C.shape
    _, bo, bi = B.shape
    N = x2.shape[0]
    Cp, Bc = _rows_p_i(C), _cols_i_c(B)  # (m1*r, n1), (bo, r*bi)
    Bct = Bc.t().unsqueeze(0).expand(m1, -1, -1)  # (m1, r*bi, bo)
    gCp, gB = C.new_zeros(m1 * r, n1), B.new_zeros(m1, bo, r * bi)
    gx = x2.new_empty(N, n1 * bi) if need_x else None
    for s, e in _chunks(N, rows):
        n = e - s
        Gt = gy[s:e].t().view(m1, bo, n)  # a view: BLAS reads it column-major
        Xt, T = _factors_first_t(x2[s:e], Cp, n1)  # recomputed, never saved
        gB.baddbmm_(Gt, T.view(m1, r * bi, n).transpose(1, 2))
        del T
        gT = torch.bmm(Bct, Gt).view(m1 * r, bi * n)
        gCp.addmm_(gT, Xt.t())
        del Xt
        if need_x:  # gxᵀ of the chunk comes out (q, c, n): one copy into the rows of gx
            gx[s:e].t().copy_(torch.mm(Cp.t(), gT).view(n1 * bi, n))
        del gT
    return gx, gCp.view(m1, r, n1).transpose(0, 1), gB.sum(0).view(bo, r, bi).transpose(0, 1)


_BACKWARD = {"input_first": _input_first_backward, "factors_first": _factors_first_backward}


class _KronLinearFn(torch.autograd.Function):
    """y = x Wᵀ + b with W = sum_i kron(S*A_i, B_i) by a factored path, saving only the inputs."""

    @staticmethod
    def forward(ctx, x2, S, A, B, bias, path, rows, shape):  # x2: (N, in), row-major or transposed
        ctx.path, ctx.rows = path, rows
        ctx.save_for_backward(x2, S, A, B)
        return _forward(x2, S * A, B, bias, path, rows, shape)

    @staticmethod
    def backward(ctx, gy):
        x2, S, A, B = ctx.saved_tensors
        gy = gy.reshape(-1, gy.shape[-1]).to(x2.dtype)  # under autocast gy may be bf16 while the saved input is fp32
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        gbias = gy.sum(0) if need_b else None
        gx, gC, gB = _BACKWARD[ctx.path](x2, S * A, B, gy, need_x, ctx.rows)
        return gx, (gC * A).sum(0), gC * S, gB, gbias, None, None, None


def _input_rows(x: Tensor, in_features: int) -> Tensor:
    """x as (N, in) rows, without a copy when it is row-major or transposed (features-major, e.g. a
    `.t()` or `.mT` the caller made): the copy would be saved for backward beside the tensor it copies,
    activation memory that dense nn.Linear does not spend."""
    x2 = x.reshape(-1, in_features)
    return x2 if x2.is_contiguous() or x2.t().is_contiguous() else x2.contiguous()


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
    x2 = _input_rows(x, in_features)
    rows = chunk_rows(in_features, m1 * bo, (bo, bi), r, path)
    return _KronLinearFn.apply(x2, S, A, B, bias, path, rows, (*x.shape[:-1], m1 * bo))

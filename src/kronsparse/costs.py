"""Exact cost counts of a Kronecker layer and its dense twin, the path chooser, the block planner.

Counting conventions (the paper's, for its MNIST table):
- "MACs" are multiply-adds per sample of the forward pass (torch.utils.flop_counter counts 2 FLOPs
  for each); "paper FLOPs" are MACs plus the bias adds, as the paper reports them.
- Memory of training state = parameters + gradients + Adam's two moments, in bytes.
- Peak training memory (`train_peak_bytes`) = what one forward + backward allocates on top of the
  parameters, the input and the upstream gradient, in bytes, as torch's allocator counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import check_block_shape, divisors, paper_block_name
from .limits import check_at_most
from .memo import memoised

# Constants of `step_cost`, in units of one multiply-add inside a large GEMM. Fitted by
# `benchmarks/calibrate_costs.py fit` (grid search, least summed slowdown of the chosen path against
# the fastest measured one) on 92 forward+backward timings (784x10 at 2x2/2x16 and 1024x1024 at
# 4x4/16x16/64x64, ranks 1-4, batch 64-4096, 2048x2048; benchmarks/results/calibration-cpu-2026-11-25.json)
# on the 2-core x86_64 VM (torch 2.13 + MKL, fp32, 2 threads): noisy, so only the ordering they
# induce is meant. Refitted after materialize moved to plain autograd (no Python backward): with the
# previous constants (launch 20000, no Function term) the summed slowdown was 7.6, now 5.0, and
# the 784x10 layer at batch 64 picks materialize at 2x2 and 2x16, the fastest there. Still missed:
# 784x300 at 2x2, batch 64 (materialize 5.1 ms where factors_first takes 3.6), outside the grid.
_BMM_COST = 2.0  # a MAC in a batched GEMM of small per-block matrices
_COPY_COST = 32.0  # one element written by a permuted copy or an elementwise pass (strided copies are slow)
_LAUNCH_COST = 200_000.0  # one extra kernel call with its autograd overhead (~7 us at ~30 GMAC/s)
_FN_LAUNCHES = 8  # the factored paths' Python autograd.Function (forward and backward), in launches

@dataclass(frozen=True)
class PathMacs:
    """Forward multiply-adds per sample of each path, and the once-per-batch weight build."""

    input_first: int
    factors_first: int
    materialize: int
    materialize_build: int  # r*out*in once per forward call, not per sample


@dataclass(frozen=True)
class LayerCosts:
    """Training and inference costs of one KronLinear and of the dense nn.Linear it replaces."""

    in_features: int
    out_features: int
    block_shape: tuple[int, int]
    rank: int
    bias: bool
    train_params: int
    dense_params: int
    macs: PathMacs
    dense_macs: int
    paper_flops: int  # min-path MACs + bias adds
    dense_paper_flops: int
    train_state_bytes: int  # params + grads + Adam moments
    dense_train_state_bytes: int


def path_macs(in_features: int, out_features: int, block_shape, rank: int) -> PathMacs:
    """Forward multiply-adds per sample of each contraction order (kernels.py)."""
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1, n1 = out_features // bo, in_features // bi
    return PathMacs(
        input_first=rank * (n1 * bi * bo + m1 * n1 * bo),
        factors_first=rank * (m1 * n1 * bi + m1 * bi * bo),
        materialize=out_features * in_features,
        materialize_build=rank * out_features * in_features,
    )


def train_params(in_features: int, out_features: int, block_shape, rank: int, bias: bool = True) -> int:
    """Trainable scalars: r*(m1*n1 + bo*bi) + m1*n1 (+ out for the bias)."""
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1n1 = (out_features // bo) * (in_features // bi)
    return rank * (m1n1 + bo * bi) + m1n1 + (out_features if bias else 0)


def layer_costs(in_features: int, out_features: int, block_shape, rank: int, bias: bool = True,
                bytes_per_element: int = 4) -> LayerCosts:
    """All counts for one layer; used by every report."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    macs = path_macs(in_features, out_features, (bo, bi), rank)
    n_train = train_params(in_features, out_features, (bo, bi), rank, bias)
    n_dense = out_features * in_features + (out_features if bias else 0)
    best = min(macs.input_first, macs.factors_first, macs.materialize)
    bias_adds = out_features if bias else 0
    return LayerCosts(
        in_features, out_features, (bo, bi), rank, bias,
        train_params=n_train,
        dense_params=n_dense,
        macs=macs,
        dense_macs=out_features * in_features,
        paper_flops=best + bias_adds,
        dense_paper_flops=out_features * in_features + bias_adds,
        train_state_bytes=4 * n_train * bytes_per_element,
        dense_train_state_bytes=4 * n_dense * bytes_per_element,
    )


def step_cost(in_features: int, out_features: int, block_shape, rank: int, batch: int,
              path: str, training: bool = True, input_grad: bool = True) -> float:
    """Estimated cost of one call (forward, or forward + backward when training) in MAC units.

    Mirrors what `kernels._KronLinearFn` runs. With F1, F2 the batch MACs of the first and
    second contraction: input_first runs F1 as batched GEMMs (forward, recompute, dB, dx) and F2 as
    one GEMM (forward, dC, dZ); factors_first the other way round (F1: forward, recompute, dC, dx
    as GEMMs; F2: forward, dB, dT batched) plus two copies of xᵀ. Materialize: the dense GEMMs plus
    building W and reducing dW. Every path copies gyᵀ or W once and adds the bias.
    """
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1, n1 = out_features // bo, in_features // bi
    r, N, o, i = rank, batch, out_features, in_features
    gx = 1 if training and input_grad else 0
    if path == "materialize":
        gemm = N * o * i * ((2 + gx) if training else 1)
        weight = r * o * i * (3 if training else 1) + _COPY_COST * o * i * (2 if training else 1)
        return gemm + weight + (_COPY_COST * N * o) + (13 + gx if training else 4) * _LAUNCH_COST
    fn = _FN_LAUNCHES // (1 if training else 2)  # forward only at inference
    if path in ("input_first", "factors_first"):  # each further chunk of rows: its kernel calls again
        chunks = n_chunks(chunk_rows(i, o, (bo, bi), r, path), N)[0]
        fn += (chunks - 1) * ((8 + gx) if training else 3)
    if path == "input_first":
        f1, f2 = N * r * n1 * bi * bo, N * r * m1 * n1 * bo
        if not training:
            return _BMM_COST * f1 + f2 + _COPY_COST * N * o + (4 + fn) * _LAUNCH_COST
        return (_BMM_COST * (3 + gx) * f1 + 3 * f2 + _COPY_COST * (2 * N * o + n1 * r * bo * bi)
                + (14 + gx + fn) * _LAUNCH_COST)
    if path == "factors_first":
        f1, f2 = N * r * m1 * n1 * bi, N * r * m1 * bi * bo
        if not training:
            return f1 + _BMM_COST * f2 + _COPY_COST * (N * i + N * o) + (5 + fn) * _LAUNCH_COST
        return ((3 + gx) * f1 + 3 * _BMM_COST * f2 + _COPY_COST * (2 * N * i + 2 * N * o + m1 * r * bo * bi)
                + (16 + gx + fn) * _LAUNCH_COST)
    raise ValueError(f"unknown path {path!r}")


# The factored paths process rows in chunks whose intermediates fit in this fraction of a dense
# weight (out*in elements), so that their peak memory stays below dense nn.Linear's (which holds a
# weight-sized gradient); chunks are never shorter than _MIN_CHUNK_ROWS rows.
_CHUNK_WEIGHT_FRACTION = 0.5
_MIN_CHUNK_ROWS = 64


def chunk_row_elements(in_features: int, out_features: int, block_shape, rank: int, path: str) -> int:
    """Elements of the intermediates live at once per row of a factored path (kernels.py): input_first
    holds a chunk of gyᵀ (out) and Z or its gradient (r*n1*bo); factors_first a chunk of xᵀ or of
    gxᵀ (in) or yᵀ (out) and T or its gradient (r*m1*bi)."""
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1, n1 = out_features // bo, in_features // bi
    if path == "input_first":
        return out_features + rank * n1 * bo
    return max(in_features, out_features) + rank * m1 * bi


@memoised(maxsize=4096)
def chunk_rows(in_features: int, out_features: int, block_shape, rank: int, path: str) -> int:
    """Rows per chunk of a factored path: intermediates within half a dense weight, >= 64 rows."""
    block_shape = tuple(block_shape)
    per_row = chunk_row_elements(in_features, out_features, block_shape, rank, path)
    return max(_MIN_CHUNK_ROWS, int(_CHUNK_WEIGHT_FRACTION * in_features * out_features) // per_row)


def n_chunks(rows: int, batch: int) -> tuple[int, int]:
    """(number of chunks, rows of the largest) for `batch` rows cut into chunks of at most `rows`
    (kernels._chunks: equal sizes, the last one shorter)."""
    n = max(1, -(-batch // rows))
    return n, -(-batch // n)


def dense_train_peak_bytes(in_features: int, out_features: int, batch: int, input_grad: bool = True,
                           bias: bool = True, bytes_per_element: int = 4) -> int:
    """Bytes nn.Linear's forward + backward allocates on top of its parameters, input and upstream
    gradient: y, gx, the weight's gradient and the bias's."""
    o, i, N = out_features, in_features, batch
    return bytes_per_element * (N * o + (N * i if input_grad else 0) + o * i + (o if bias else 0))


def train_peak_bytes(in_features: int, out_features: int, block_shape, rank: int, batch: int, path: str,
                     input_grad: bool = True, bias: bool = True, bytes_per_element: int = 4) -> int:
    """Peak bytes one forward + backward of `path` (kernels.py) allocates on top of the parameters,
    input and upstream gradient, as torch's allocator counts them (benchmarks/memory.py measures it;
    tests/test_memory.py checks the two agree). The backward is the peak: y, gx and the bias gradient
    (as dense), C = S*A and its gradient, the accumulated B gradient and one chunk of intermediates;
    materialize holds W and its gradient instead (plain autograd; dense holds only the gradient)."""
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1, n1 = out_features // bo, in_features // bi
    o, i, N, r = out_features, in_features, batch, rank
    act = N * o + (N * i if input_grad else 0) + (o if bias else 0)
    if path == "materialize":
        return bytes_per_element * (act + 2 * o * i + r * m1 * n1)
    rows = n_chunks(chunk_rows(i, o, (bo, bi), r, path), N)[1]
    chunk = rows * chunk_row_elements(i, o, (bo, bi), r, path)
    if path == "input_first":
        factors = (3 if r > 1 else 2) * r * m1 * n1 + r * n1 * bo * bi  # C, (C permuted), gC, gB per q
    elif path == "factors_first":  # backward's chunk holds xᵀ or gxᵀ (in) with T or gT; forward's yᵀ
        factors = (3 if r > 1 else 2) * r * m1 * n1 + r * m1 * bo * bi + (r * bo * bi if r > 1 else 0)
        chunk = rows * (i + r * m1 * bi)
        forward = N * o + (2 if r > 1 else 1) * r * m1 * n1 + rows * (o + r * m1 * bi)  # y, C, a chunk's yᵀ and T
        return bytes_per_element * max(act + factors + chunk, forward)
    else:
        raise ValueError(f"unknown path {path!r}")
    return bytes_per_element * (act + factors + chunk)


def choose_path(in_features: int, out_features: int, block_shape, rank: int, batch: int,
                training: bool = True, input_grad: bool = True) -> str:
    """The cheapest path for this layer and batch by `step_cost` among those whose training peak
    memory (`train_peak_bytes`) is at most dense nn.Linear's; the cheapest of all where none is
    (small blocks at high rank, whose factors are nearly as large as W). Memoised: called every
    forward."""
    return _choose_path(in_features, out_features, tuple(block_shape), rank, batch, training, input_grad)


@memoised(maxsize=4096)
def _choose_path(in_features, out_features, block_shape, rank, batch, training, input_grad) -> str:
    paths = ("input_first", "factors_first", "materialize")
    if training:
        dense = dense_train_peak_bytes(in_features, out_features, batch, input_grad)
        paths = tuple(p for p in paths if train_peak_bytes(in_features, out_features, block_shape, rank, batch, p,
                                                          input_grad) <= dense) or paths
    return min(paths, key=lambda p: step_cost(in_features, out_features, block_shape, rank, batch, p,
                                              training, input_grad))


@dataclass(frozen=True)
class ShapeRow:
    block_shape: tuple[int, int]
    paper_name: str  # the paper's "in x out" naming, e.g. (2, 16) -> "16x2"
    train_params: int
    macs: int  # cheapest factored or dense path, per sample
    best: bool  # minimises trainable parameters


def plan_block_shapes(in_features: int, out_features: int, rank: int, bias: bool = True) -> list[ShapeRow]:
    """Every block shape that tiles the layer with its training cost; `best` marks the fewest params."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    check_at_most("rank", rank)
    for name, n in (("out_features", out_features), ("in_features", in_features)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
        check_at_most("features", n, name)
    out_divs, in_divs = divisors(out_features), divisors(in_features)
    check_at_most("shape_rows", len(out_divs) * len(in_divs), "the number of block shapes to list,")
    rows = []
    for bo in out_divs:
        for bi in in_divs:
            m = path_macs(in_features, out_features, (bo, bi), rank)
            params = train_params(in_features, out_features, (bo, bi), rank, bias)
            rows.append(ShapeRow((bo, bi), paper_block_name((bo, bi)), params,
                                 min(m.input_first, m.factors_first, m.materialize), False))
    fewest = min(r.train_params for r in rows)
    return [ShapeRow(r.block_shape, r.paper_name, r.train_params, r.macs, r.train_params == fewest) for r in rows]

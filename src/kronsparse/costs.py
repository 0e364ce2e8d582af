"""Exact cost counts of a Kronecker layer and its dense twin, the path chooser, the block planner.

Counting conventions (METHOD.md §6):
- "MACs" are multiply-adds per sample of the forward pass (torch.utils.flop_counter counts 2 FLOPs
  for each); "paper FLOPs" are MACs plus the bias adds, as the paper reports them.
- Memory of training state = parameters + gradients + Adam's two moments, in bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .functional import check_block_shape, divisors

# Per-element cost, in multiply-add equivalents, of writing and reading an intermediate that a
# factored path creates (its permuted copies). Calibrated roughly on CPU; only the ordering matters.
_COPY_COST = 4.0
# Fixed cost of one extra kernel launch, in multiply-adds (a few microseconds on either device).
_LAUNCH_COST = 20_000.0


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

    out_features: int
    in_features: int
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

    def as_dict(self) -> dict:
        return asdict(self)


def path_macs(out_features: int, in_features: int, block_shape, rank: int) -> PathMacs:
    """Forward multiply-adds per sample of each path (METHOD.md §2)."""
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1, n1 = out_features // bo, in_features // bi
    return PathMacs(
        input_first=rank * (n1 * bi * bo + m1 * n1 * bo),
        factors_first=rank * (m1 * n1 * bi + m1 * bi * bo),
        materialize=out_features * in_features,
        materialize_build=rank * out_features * in_features,
    )


def train_params(out_features: int, in_features: int, block_shape, rank: int, bias: bool = True) -> int:
    """Trainable scalars: r*(m1*n1 + bo*bi) + m1*n1 (+ out for the bias)."""
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1n1 = (out_features // bo) * (in_features // bi)
    return rank * (m1n1 + bo * bi) + m1n1 + (out_features if bias else 0)


def layer_costs(out_features: int, in_features: int, block_shape, rank: int, bias: bool = True,
                bytes_per_element: int = 4) -> LayerCosts:
    """All counts for one layer; used by every report."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    macs = path_macs(out_features, in_features, (bo, bi), rank)
    n_train = train_params(out_features, in_features, (bo, bi), rank, bias)
    n_dense = out_features * in_features + (out_features if bias else 0)
    best = min(macs.input_first, macs.factors_first, macs.materialize)
    bias_adds = out_features if bias else 0
    return LayerCosts(
        out_features, in_features, (bo, bi), rank, bias,
        train_params=n_train,
        dense_params=n_dense,
        macs=macs,
        dense_macs=out_features * in_features,
        paper_flops=best + bias_adds,
        dense_paper_flops=out_features * in_features + bias_adds,
        train_state_bytes=4 * n_train * bytes_per_element,
        dense_train_state_bytes=4 * n_dense * bytes_per_element,
    )


def step_cost(out_features: int, in_features: int, block_shape, rank: int, batch: int,
              path: str, training: bool = True) -> float:
    """Estimated cost of one call (forward, or forward + backward when training) in MAC units.

    Factored paths: forward F1 + F2; backward recomputes F1 and does 2*F2 + 2*F1 more, and every
    intermediate is copied a few times. Materialize: the batch GEMMs plus building W and, in
    backward, reducing dW to the factors.
    """
    bo, bi = check_block_shape(out_features, in_features, block_shape)
    m1, n1 = out_features // bo, in_features // bi
    r, N = rank, batch
    if path == "materialize":
        gemm, build = N * out_features * in_features, r * out_features * in_features
        launches = 3
        total = 3 * gemm + 3 * build if training else gemm + build
        return total + _COPY_COST * out_features * in_features * (2 if training else 1) + launches * _LAUNCH_COST
    if path == "input_first":
        f1, f2, inter = N * r * n1 * bi * bo, N * r * m1 * n1 * bo, N * r * n1 * bo
    elif path == "factors_first":
        f1, f2, inter = N * r * m1 * n1 * bi, N * r * m1 * bi * bo, N * r * m1 * bi
    else:
        raise ValueError(f"unknown path {path!r}")
    if training:
        return 4 * f1 + 3 * f2 + 3 * _COPY_COST * inter + 7 * _LAUNCH_COST
    return f1 + f2 + _COPY_COST * inter + 2 * _LAUNCH_COST


def choose_path(out_features: int, in_features: int, block_shape, rank: int, batch: int,
                training: bool = True) -> str:
    """The cheapest path for this layer and batch by `step_cost`."""
    paths = ("input_first", "factors_first", "materialize")
    return min(paths, key=lambda p: step_cost(out_features, in_features, block_shape, rank, batch, p, training))


@dataclass(frozen=True)
class ShapeRow:
    block_shape: tuple[int, int]
    paper_name: str  # the paper's "in x out" naming, e.g. (2, 16) -> "16x2"
    train_params: int
    macs: int  # cheapest factored or dense path, per sample
    best: bool  # minimises trainable parameters


def plan_block_shapes(out_features: int, in_features: int, rank: int, bias: bool = True) -> list[ShapeRow]:
    """Every block shape that tiles the layer with its training cost; `best` marks the fewest params."""
    rows = []
    for bo in divisors(out_features):
        for bi in divisors(in_features):
            m = path_macs(out_features, in_features, (bo, bi), rank)
            rows.append(ShapeRow((bo, bi), f"{bi}x{bo}", train_params(out_features, in_features, (bo, bi), rank, bias),
                                 min(m.input_first, m.factors_first, m.materialize), False))
    fewest = min(r.train_params for r in rows)
    return [ShapeRow(r.block_shape, r.paper_name, r.train_params, r.macs, r.train_params == fewest) for r in rows]

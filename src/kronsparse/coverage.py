"""What a Sparsifier sparsified and what it left dense, and why: `Sparsifier.summary()`.

A block sparsity of 50% says little when the sparsified layers hold 8% of the model's weights
(GPT-2 before its Conv1D projections counted), so the summary lists every module that owns a
weight matrix or kernel, sparsified or not, with the reason it stayed dense, and the share of the
model's weights the sparsified layers hold (`coverage`). Weights are counted once however many
names share them (a tied embedding).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .blocks import tiles
from .model_tree import is_weight_layer, layer_dims, layer_kind, layer_weight, plain_type, tied_weights

COVERAGE_WARNING = 0.5  # below this share of the model's weights in sparsified layers, the Sparsifier warns


@dataclass
class LayerRow:
    """One module owning weights. `stats` holds per-layer numbers (block sparsity now; a method may
    add its own, e.g. how many zero blocks its final top-up made)."""

    name: str
    kind: str  # the module's class name
    shape: tuple[int, ...]  # the weight in (out, in[, kh, kw]) order
    weights: int
    sparsified: bool
    reason: str = ""  # why it stayed dense
    grid: tuple[int, int] | None = None  # (m1, n1) block rows and columns, when sparsified
    stats: dict = field(default_factory=dict)


@dataclass
class SparsitySummary:
    """Printable: `print(sp.summary())`. `summary["key"]` reads the method's own numbers (`method_stats`)."""

    method: str
    block_shape: tuple[int, int]
    layers: list[LayerRow]
    total_weights: int  # every parameter of two or more dims in the model, ties counted once
    method_stats: dict = field(default_factory=dict)

    @property
    def covered_weights(self) -> int:
        return sum(r.weights for r in self.layers if r.sparsified)

    @property
    def coverage(self) -> float:
        """Share of the model's weights that lie in sparsified layers."""
        return self.covered_weights / max(1, self.total_weights)

    @property
    def block_sparsity(self) -> float:
        """Zero blocks / blocks over the sparsified layers."""
        rows = [r for r in self.layers if r.sparsified]
        blocks = sum(r.grid[0] * r.grid[1] for r in rows)
        return sum(r.stats["zero_blocks"] for r in rows) / max(1, blocks)

    def dense(self) -> list[LayerRow]:
        return [r for r in self.layers if not r.sparsified]

    def __getitem__(self, key: str):
        return self.method_stats[key]

    def __str__(self) -> str:
        bo, bi = self.block_shape
        lines = [f"{self.method}, {bo}x{bi} blocks: {sum(r.sparsified for r in self.layers)} layers sparsified, "
                 f"{self.covered_weights:,} of {self.total_weights:,} weights ({self.coverage:.1%}); "
                 f"block sparsity {self.block_sparsity:.1%} of those layers"]
        width = max([len(r.name) for r in self.layers] + [5])
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            what = (f"{r.grid[0]}x{r.grid[1]} blocks, {r.stats['zero_blocks'] / (r.grid[0] * r.grid[1]):.1%} zero"
                    if r.sparsified else f"dense: {r.reason}")
            if r.sparsified and "topped_up_blocks" in r.stats:
                what += f" ({r.stats['topped_up_blocks']} of {r.stats['zero_blocks']} from the final top-up)"
            lines.append(f"  {r.name or '(model)':<{width}}  {r.kind:<18} {shape:<14} {r.weights:>10,}  {what}")
        return "\n".join(lines)


def model_weights(model: nn.Module) -> int:
    """Parameters of two or more dims (matrices, kernels, embeddings), each Parameter once; a
    Kronecker layer counts its dense weight's size, once: a KronSelectLinear's candidate terms
    (KronLinears inside it, summed into one W) are not counted again."""
    seen, total = set(), 0
    for m in model.modules():  # outer modules first: a KronSelectLinear before its candidates
        if hasattr(m, "dense_weight"):
            params = [id(p) for p in m.parameters()]
            if not all(i in seen for i in params):
                total += layer_weight_numel(m)
                seen.update(params)
    for p in model.parameters():
        if id(p) not in seen and p.dim() >= 2:
            seen.add(id(p))
            total += p.numel()
    return total


def layer_weight_numel(layer: nn.Module) -> int:
    i, o = layer_dims(layer)
    kernel = getattr(layer, "kernel_size", (1, 1))
    return i * o * kernel[0] * kernel[1]


def dense_reason(name: str, module: nn.Module, block_shapes, kinds: tuple, tied: dict[str, list[str]]) -> str:
    """Why a module owning weights is not sparsified (the checks of model_tree.find_layers, in words)."""
    if isinstance(module, nn.MultiheadAttention):
        return ("nn.MultiheadAttention: its in_proj_weight and out_proj are read as raw tensors by "
                "F.multi_head_attention_forward (use separate nn.Linear projections to sparsify them)")
    if isinstance(module, nn.Embedding):
        return "an embedding (a table lookup, not a matmul)"
    if plain_type(module) is nn.Conv2d and module.groups != 1:
        return f"a grouped or depthwise conv (groups={module.groups}): blocks over its channels do not exist"
    if plain_type(module) is nn.Conv2d and not is_weight_layer(module):
        return "a dilated or non-zero-padded conv"
    if not is_weight_layer(module):
        return f"not a weight layer kronsparse sparsifies ({plain_type(module).__name__})"
    if name in tied:
        return f"its weight is tied to {', '.join(tied[name])} (name it in layers= to sparsify both)"
    if layer_kind(module) not in kinds and not any(isinstance(module, k) for k in kinds if isinstance(k, type)):
        return "the method does not work on this kind of layer"
    i, o = layer_dims(module)
    for shape in block_shapes:
        if not tiles(i, o, shape):
            return f"block shape {shape[0]}x{shape[1]} does not tile its (out, in) = ({o}, {i})"
    return "excluded by the layers= argument"


def owned_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that owns a parameter of two or more dims (or is a weight layer), outermost
    first; not those inside a weight layer or an nn.MultiheadAttention (reported as one)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if any(outer == "" or name.startswith(outer + ".") for outer, o in found.items()
               if is_weight_layer(o) or isinstance(o, nn.MultiheadAttention)):  # inside one already listed
            continue
        if is_weight_layer(m) or isinstance(m, nn.MultiheadAttention) or any(
                p.dim() >= 2 for p in m.parameters(recurse=False)):
            found[name] = m
    return found


def summarize(model: nn.Module, sparsified: dict[str, nn.Module], block_shape, method: str,
              kinds: tuple = (), block_shapes=None, method_stats: dict | None = None,
              counts: dict[str, tuple[int, int]] | None = None, originals: dict[str, type] | None = None,
              layer_stats: dict[str, dict] | None = None) -> SparsitySummary:
    """The summary of `model` with the layers `sparsified` (by name); counts: {name: (zero blocks,
    blocks)} measured on the dense weights; originals: {name: the type a layer had before a
    method swapped it} (shown as its kind); layer_stats: {name: the method's numbers for it}."""
    tied, rows, shapes = tied_weights(model), [], block_shapes or [tuple(block_shape)]
    for name, m in owned_weight_modules(model).items():
        if name in sparsified:
            W = layer_weight(m)
            zero, blocks = (counts or {}).get(name, (0, 0))
            m1 = W.shape[0] // block_shape[0]
            kind = (originals or {}).get(name, plain_type(m)).__name__
            rows.append(LayerRow(name, kind, tuple(W.shape), W.numel(), True,
                                 grid=(m1, blocks // max(1, m1)),
                                 stats={"zero_blocks": zero, **(layer_stats or {}).get(name, {})}))
            continue
        if is_weight_layer(m):
            W = layer_weight(m)
            shape, weights = tuple(W.shape), W.numel()
        else:  # an attention block with its projections, an embedding, a module's own tensors
            own = [p for p in m.parameters(recurse=isinstance(m, nn.MultiheadAttention)) if p.dim() >= 2]
            shape, weights = tuple(own[0].shape), sum(p.numel() for p in own)
        rows.append(LayerRow(name, plain_type(m).__name__, shape, weights, False, dense_reason(name, m, shapes, kinds, tied)))
    return SparsitySummary(method, tuple(block_shape), rows, model_weights(model), dict(method_stats or {}))


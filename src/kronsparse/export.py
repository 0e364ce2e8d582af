"""Export a trained model as plain tensors: dense, torch.sparse BSR, or the Kronecker factors.

Every export is one safetensors file; its header metadata holds one JSON string under the key
"kronsparse" that says how to read the tensors. Nothing is ever pickled.

- "dense":   every weight dense, with its exact zero blocks: a state_dict the plain model loads.
- "bsr":     each weight on the block grid as W.to_sparse_bsr(blocksize), stored as
             `NAME.weight.crow_indices`, `.col_indices`, `.values`; a conv weight (out, in, kh, kw)
             is stored as its matrix (out, in*kh*kw) in (bo, bi*kh*kw) blocks. Other tensors dense.
- "factors": S, A, B of every Kron layer (`NAME.S`, `NAME.A`, `NAME.B`), the rest dense: the
             state_dict of the Kron model itself.

Metadata: {"format", "model", "block_shape", "layers": {NAME: {"kind": "linear" | "conv2d",
"shape", "block_shape", "sparse", "stride", "padding", "bias", "transposed"}}, "aliases": {DROPPED: KEPT}}
"shape" is always nn.Linear's (out, in) order; "transposed" (optional, a transformers Conv1D) says
that a dense `NAME.weight` is stored as the module holds it, (in, out), so the plain model loads it.
(tied tensors are stored once; `read_export` restores every name). NAME is the module's name
("layers.2"), or "" for a run of the one-layer "linear" model, whose tensors are `weight`, `bias`.

A run folder of `kronsparse train` is exported by the application (training/run_folder.py), which
reads it into the LayerEntry list that `write_export` takes.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from .atomic import write_safetensors
from .layers import KRON_LAYERS, KronConv2d, matrix_view
from .limits import limit

FORMATS = ("dense", "bsr", "factors")
META_KEY = "kronsparse"
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDICES = (torch.int32, torch.int64)


class ExportError(ValueError):
    """An export file that is not what a kronsparse export must be; one line naming the file and the fault."""


@dataclass
class LayerEntry:
    """One weight layer to export: its dense weight, its factors if any, and how it is applied."""

    name: str
    weight: Tensor  # (out, in) or (out, in, kh, kw), exact zero blocks
    bias: Tensor | None
    block_shape: tuple[int, int] | None  # None: not on the block grid (kept dense)
    factors: dict[str, Tensor] | None = None  # S, A, B
    stride: int | tuple = 1
    padding: int | tuple = 0
    transposed: bool = False  # a Conv1D: `weight` is (out, in), its dense tensor is stored (in, out)

    def key(self, leaf: str) -> str:
        return f"{self.name}.{leaf}" if self.name else leaf

    def meta(self) -> dict:
        kind = "conv2d" if self.weight.dim() == 4 else "linear"
        m = {"kind": kind, "shape": list(self.weight.shape), "sparse": self.block_shape is not None,
             "block_shape": list(self.block_shape) if self.block_shape else None, "bias": self.bias is not None}
        if kind == "conv2d":
            m.update(stride=_pair(self.stride), padding=_pair(self.padding))
        if self.transposed:
            m["transposed"] = True
        return m


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    return fmt


def bsr_matrix(W2: Tensor, blocks) -> Tensor:
    """W2.to_sparse_bsr(blocks) without torch's "BSR support is in beta" warning: the BSR paths
    kronsparse uses are tested here, so the warning would only alarm users."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta", category=UserWarning)
        return W2.to_sparse_bsr(blocks)


def to_bsr(W: Tensor, block_shape) -> dict[str, Tensor]:
    """crow_indices, col_indices, values of W (2-D or conv) in (bo, bi) blocks; zero blocks dropped."""
    W2, blocks = matrix_view(W.detach(), block_shape)
    bsr = bsr_matrix(W2, blocks)
    return {"crow_indices": bsr.crow_indices(), "col_indices": bsr.col_indices(), "values": bsr.values()}


def from_bsr(parts: dict[str, Tensor], shape) -> Tensor:
    """The torch.sparse BSR matrix of `parts`; shape is the exported weight's (2-D or 4-D) shape.
    Its indices are checked (they come from a file), which also answers torch's invariant-check warning."""
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta", category=UserWarning)
        return torch.sparse_bsr_tensor(parts["crow_indices"], parts["col_indices"], parts["values"], (rows, cols),
                                       check_invariants=True)


def entry_tensors(entry: LayerEntry, fmt: str) -> dict[str, Tensor]:
    out = {}
    if fmt == "factors" and entry.factors is not None:
        out.update({entry.key(k): v for k, v in entry.factors.items()})
    elif fmt == "bsr" and entry.block_shape is not None:
        out.update({entry.key(f"weight.{k}"): v for k, v in to_bsr(entry.weight, entry.block_shape).items()})
    else:
        out[entry.key("weight")] = entry.weight.t() if entry.transposed else entry.weight
    if entry.bias is not None:
        out[entry.key("bias")] = entry.bias
    return out


def write_export(path, entries: list[LayerEntry], rest: dict[str, Tensor], fmt: str, model: str,
                 block_shape) -> Path:
    """Write `entries` (the weight layers) and `rest` (other tensors, dense) as format `fmt`."""
    check_format(fmt)
    if fmt == "factors" and not any(e.factors for e in entries):
        raise ValueError("format 'factors' needs Kron layers; this model has none (it was not trained "
                         "with the kron method): export it as dense or bsr")
    tensors = dict(rest)
    for e in entries:
        tensors.update(entry_tensors(e, fmt))
    tensors, aliases = _drop_aliases(tensors)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    layers = {e.name: {**e.meta(), "stored": _stored(e, fmt)} for e in entries}
    meta = {"format": fmt, "model": model, "block_shape": list(block_shape) if block_shape else None,
            "layers": layers, "aliases": aliases}
    write_safetensors(path, tensors, {"format": "pt", META_KEY: json.dumps(meta)})
    return Path(path)


def _drop_aliases(tensors: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tied tensors (one storage under two names, e.g. an embedding and its output layer) are
    stored once; aliases maps each dropped name to the kept one."""
    kept, seen, aliases = {}, {}, {}
    for k, v in tensors.items():
        ident = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.stride())
        if v.numel() and ident in seen:
            aliases[k] = seen[ident]
        else:
            seen[ident] = k
            kept[k] = v
    return kept, aliases


def _stored(e: LayerEntry, fmt: str) -> str:
    if fmt == "factors" and e.factors is not None:
        return "factors"
    return "bsr" if fmt == "bsr" and e.block_shape is not None else "dense"


# --------------------------------------------------------------------------------------------
# Source: any nn.Module holding Kron layers
# --------------------------------------------------------------------------------------------


def model_entries(model: nn.Module, block_shapes: dict[str, tuple[int, int]] | None = None
                  ) -> tuple[list[LayerEntry], dict[str, Tensor]]:
    """Every KronLinear / KronConv2d (on the block grid) and plain nn.Linear / nn.Conv2d / Conv1D
    (dense, or on the grid of `block_shapes[name]`, e.g. a Sparsifier's layers) of `model` as an
    entry; all other state as `rest`."""
    from .model_tree import is_conv1d

    entries, owned, grids = [], set(), block_shapes or {}
    for name, m in model.named_modules():
        if isinstance(m, KRON_LAYERS):
            conv = isinstance(m, KronConv2d)
            entries.append(LayerEntry(name, m.dense_weight().detach(), m.bias, m.block_shape,
                                      {k: getattr(m, k).detach() for k in ("S", "A", "B")},
                                      m.stride if conv else 1, m.padding if conv else 0))
            owned.add(name)
        elif type(m) is nn.Linear or is_conv1d(m) or (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1)
                                                      and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
            conv = type(m) is nn.Conv2d
            W = m.weight.detach()
            entries.append(LayerEntry(name, W.t() if is_conv1d(m) else W, m.bias, grids.get(name), None,
                                      m.stride if conv else 1, m.padding if conv else 0, transposed=is_conv1d(m)))
            owned.add(name)
    rest = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in owned}
    return entries, rest


def export_model(model: nn.Module, path, fmt: str = "dense", model_name: str = "custom",
                 block_shapes: dict[str, tuple[int, int]] | None = None) -> Path:
    """Export any model holding Kron layers (e.g. after `swap_linear_`), or plain layers on a block
    grid (`block_shapes`: {layer name: (bo, bi)}, what `Sparsifier.export` passes), to one
    safetensors file.

    "dense" gives the state_dict of the model with every Kron layer swapped back to nn.Linear /
    nn.Conv2d; "factors" gives the Kron model's own state_dict.
    """
    entries, rest = model_entries(model, block_shapes)
    shapes = {tuple(e.block_shape) for e in entries if e.block_shape is not None}
    return write_export(path, entries, rest, fmt, model_name, shapes.pop() if len(shapes) == 1 else None)


def read_export(path) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of an export file, without unpickling anything.

    Everything is checked before a tensor is built from it: the safetensors header (by the
    safetensors library), our metadata and the size of the dense weights it would build (before
    any tensor is read), then dtypes, shapes, BSR index invariants and finite values. A bad file
    raises ExportError, never crashes.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export file {path} {'is not a regular file' if path.exists() else 'does not exist'}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if META_KEY not in header:
                raise ExportError(f"{path} is not a kronsparse export (no '{META_KEY}' metadata)")
            meta = _parse_meta(path, header[META_KEY])
            # a stored tensor takes what the file holds (safetensors checks every offset against the
            # file's size); what a small file can multiply is the dense weights built from it (below)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except ExportError:
        raise
    except Exception as err:  # safetensors' own header checks (SafetensorError), bad dtypes, I/O
        raise ExportError(f"{path}: not a readable safetensors file ({_first_line(err)})") from None
    for alias, name in meta["aliases"].items():
        if name not in tensors:
            raise ExportError(f"{path}: alias {alias!r} names a tensor that is not stored ({name!r})")
        tensors[alias] = tensors[name]
    for name, m in meta["layers"].items():
        _check_layer(path, name, m, tensors)
    return meta, tensors


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _check_size(path, key: str, shape) -> None:
    n = 1
    for d in shape:
        n *= int(d)
    if n > limit("tensor_elements"):
        raise ExportError(f"{path}: {key} has {n} elements, over the limit of {limit('tensor_elements')} "
                          "(set KRONSPARSE_MAX_TENSOR_ELEMENTS to allow more)")


def _is_ints(v, n: int | None = None, low: int = 1) -> bool:
    return (isinstance(v, list) and (n is None or len(v) == n)
            and all(type(t) is int and low <= t < 2**40 for t in v))


def _parse_meta(path, text: str) -> dict:
    """The JSON metadata, with the type of every field checked."""
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise ExportError(f"{path}: its '{META_KEY}' metadata is not JSON ({_first_line(err)})") from None
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS or not isinstance(meta.get("model"), str):
        raise ExportError(f"{path}: metadata needs 'format' (one of {', '.join(FORMATS)}) and 'model'")
    layers, aliases = meta.get("layers"), meta.setdefault("aliases", {})
    if not isinstance(layers, dict) or not isinstance(aliases, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ExportError(f"{path}: metadata 'layers' and 'aliases' must be objects of names")
    for name, m in layers.items():
        if not isinstance(m, dict):
            raise ExportError(f"{path}: layer {name!r}: metadata is not an object")
        kind, shape = m.get("kind"), m.get("shape")
        ok = (kind == "linear" and _is_ints(shape, 2)) or (kind == "conv2d" and _is_ints(shape, 4))
        ok = ok and m.get("stored") in ("dense", "bsr", "factors") and isinstance(m.get("sparse"), bool)
        ok = ok and (not m["sparse"] or _is_ints(m.get("block_shape"), 2))
        ok = ok and (kind != "conv2d" or (_is_ints(m.get("stride"), 2) and _is_ints(m.get("padding"), 2, low=0)))
        ok = ok and m.get("transposed", False) in (True, False) and not (m.get("transposed") and kind != "linear")
        if not ok:
            raise ExportError(f"{path}: layer {name!r}: bad metadata (kind, shape, stored, sparse, block_shape, "
                              f"stride, padding): {json.dumps(m)[:200]}")
    built = [math.prod(m["shape"]) for m in layers.values() if m["stored"] != "dense"]
    _check_size(path, "the dense weights built from BSR and factor layers, all together,", [sum(built)])
    return meta


def _tensor(path, tensors: dict, key: str, shape=None, dtypes=FLOATS) -> Tensor:
    """tensors[key], checked for presence, dtype, shape and (floats) finite values."""
    if key not in tensors:
        raise ExportError(f"{path}: tensor {key} is missing")
    t = tensors[key]
    if t.dtype not in dtypes:
        raise ExportError(f"{path}: tensor {key} has dtype {t.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ExportError(f"{path}: tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype in FLOATS and not torch.isfinite(t).all():
        raise ExportError(f"{path}: tensor {key} holds NaN or infinite values")
    return t


def _check_layer(path, name: str, m: dict, tensors: dict) -> None:
    """One layer's tensors against its metadata, so that building its modules cannot fail or crash."""
    key = (lambda leaf: f"{name}.{leaf}") if name else (lambda leaf: leaf)
    shape = m["shape"]
    rows, cols = shape[0], math.prod(shape[1:])
    if m["sparse"]:
        bo, bi = m["block_shape"]
        bi_eff = bi * math.prod(shape[2:])
        if shape[0] % bo or shape[1] % bi:
            raise ExportError(f"{path}: layer {name!r}: block shape {bo}x{bi} does not tile its shape {shape}")
    if m["stored"] == "bsr":
        if not m["sparse"]:
            raise ExportError(f"{path}: layer {name!r} is stored as BSR but has no block shape")
        crow = _tensor(path, tensors, key("weight.crow_indices"), dtypes=INDICES)
        col = _tensor(path, tensors, key("weight.col_indices"), dtypes=INDICES)
        values = dtype_of = _tensor(path, tensors, key("weight.values"))
        check_bsr_indices(crow, col, values, rows // bo, cols // bi_eff, (bo, bi_eff), f"{path}: layer {name!r}")
    elif m["stored"] == "factors":
        S = dtype_of = _tensor(path, tensors, key("S"))
        A = _tensor(path, tensors, key("A"))
        B = _tensor(path, tensors, key("B"))
        ok = S.dim() == 2 and A.dim() == 3 and B.dim() >= 3 and A.shape[1:] == S.shape
        ok = ok and A.shape[0] == B.shape[0] >= 1 and S.dtype == A.dtype == B.dtype
        ok = ok and S.shape[0] * B.shape[1] == rows and S.shape[1] * math.prod(B.shape[2:]) == cols
        if not ok or m["kind"] == "conv2d" and tuple(B.shape[2:]) != (shape[1] // S.shape[1], *shape[2:]):
            raise ExportError(f"{path}: layer {name!r}: factors S {tuple(S.shape)}, A {tuple(A.shape)}, "
                              f"B {tuple(B.shape)} do not make a weight of shape {tuple(shape)}")
        _check_size(path, f"{name}: rank x weight", [A.shape[0], rows, cols])
    else:
        dtype_of = _tensor(path, tensors, key("weight"), shape[::-1] if m.get("transposed") else shape)
    if m.get("bias") is True or key("bias") in tensors:
        if _tensor(path, tensors, key("bias"), (rows,)).dtype != dtype_of.dtype:
            raise ExportError(f"{path}: layer {name!r}: bias and weight have different dtypes")


def check_bsr_indices(crow: Tensor, col: Tensor, values: Tensor, block_rows: int, block_cols: int,
                      blocksize, where: str) -> None:
    """The invariants torch.sparse BSR kernels assume but do not check: a violation is a segfault."""
    nnz = len(col)
    problems = []
    if crow.dim() != 1 or len(crow) != block_rows + 1:
        problems.append(f"crow_indices has shape {tuple(crow.shape)}, expected ({block_rows + 1},)")
    elif crow[0] != 0 or crow[-1] != nnz or (crow.diff() < 0).any():
        problems.append(f"crow_indices must rise from 0 to nnz={nnz}")
    if col.dim() != 1:
        problems.append(f"col_indices has shape {tuple(col.shape)}, expected (nnz,)")
    elif nnz and (col.min() < 0 or col.max() >= block_cols):
        problems.append(f"col_indices must lie in [0, {block_cols})")
    if tuple(values.shape) != (nnz, *blocksize):
        problems.append(f"values has shape {tuple(values.shape)}, expected ({nnz}, {blocksize[0]}, {blocksize[1]})")
    if not problems and nnz:  # within each block row, columns strictly increase
        starts = torch.zeros(nnz, dtype=torch.bool)
        starts[crow[:-1][crow[:-1] < nnz].long()] = True
        if ((col.diff() <= 0) & ~starts[1:]).any():
            problems.append("col_indices must strictly increase within each block row")
    if problems:
        raise ExportError(f"{where}: bad BSR weight: {'; '.join(problems)}")

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
"shape", "block_shape", "sparse", "stride", "padding", "bias"}}, "aliases": {DROPPED: KEPT}}
(tied tensors are stored once; `read_export` restores every name). NAME is the module's name
("layers.2"), or "" for a run of the one-layer "linear" model, whose tensors are `weight`, `bias`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .io import write_safetensors
from .layers import KRON_LAYERS, KronConv2d, matrix_view

FORMATS = ("dense", "bsr", "factors")
META_KEY = "kronsparse"


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

    def key(self, leaf: str) -> str:
        return f"{self.name}.{leaf}" if self.name else leaf

    def meta(self) -> dict:
        kind = "conv2d" if self.weight.dim() == 4 else "linear"
        m = {"kind": kind, "shape": list(self.weight.shape), "sparse": self.block_shape is not None,
             "block_shape": list(self.block_shape) if self.block_shape else None, "bias": self.bias is not None}
        if kind == "conv2d":
            m.update(stride=_pair(self.stride), padding=_pair(self.padding))
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
        out[entry.key("weight")] = entry.weight
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
# Sources: any nn.Module holding Kron layers, or a run folder of `kronsparse train`
# --------------------------------------------------------------------------------------------


def model_entries(model: nn.Module) -> tuple[list[LayerEntry], dict[str, Tensor]]:
    """Every KronLinear / KronConv2d (on the block grid) and plain nn.Linear / nn.Conv2d (dense) of
    `model` as an entry; all other state as `rest`."""
    entries, owned = [], set()
    for name, m in model.named_modules():
        if isinstance(m, KRON_LAYERS):
            conv = isinstance(m, KronConv2d)
            entries.append(LayerEntry(name, m.dense_weight().detach(), m.bias, m.block_shape,
                                      {k: getattr(m, k).detach() for k in ("S", "A", "B")},
                                      m.stride if conv else 1, m.padding if conv else 0))
            owned.add(name)
        elif type(m) is nn.Linear or (type(m) is nn.Conv2d and m.groups == 1 and m.dilation == (1, 1)
                                      and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
            conv = type(m) is nn.Conv2d
            entries.append(LayerEntry(name, m.weight.detach(), m.bias, None, None,
                                      m.stride if conv else 1, m.padding if conv else 0))
            owned.add(name)
    rest = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in owned}
    return entries, rest


def export_model(model: nn.Module, path, fmt: str = "dense", model_name: str = "custom") -> Path:
    """Export any model holding Kron layers (e.g. after `swap_linear_`) to one safetensors file.

    "dense" gives the state_dict of the model with every Kron layer swapped back to nn.Linear /
    nn.Conv2d; "factors" gives the Kron model's own state_dict.
    """
    entries, rest = model_entries(model)
    shapes = {tuple(e.block_shape) for e in entries if e.block_shape is not None}
    return write_export(path, entries, rest, fmt, model_name, shapes.pop() if len(shapes) == 1 else None)


def run_entries(run_dir) -> tuple[list[LayerEntry], str, tuple[int, int]]:
    """The weight layers of a finished `kronsparse train` run, read from its files."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    metrics_path, weights_path = run_dir / "metrics.json", run_dir / "model.safetensors"
    if not metrics_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (metrics.json and model.safetensors are needed)")
    metrics = json.loads(metrics_path.read_text())
    model, block_shape = metrics["model"], tuple(metrics["block_shape"])
    t = load_file(str(weights_path))
    names = [""] if model == "linear" else sorted({k.split(".")[1] for k in t if k.startswith("layers.")}, key=int)
    padding = _conv_padding(model)
    entries = []
    for k, idx in enumerate(names):
        name = f"layers.{idx}" if idx != "" else ""
        e = LayerEntry(name, t[_key(name, "weight")], t.get(_key(name, "bias")),
                       block_shape if k in metrics.get("sparsified_layers", []) else None)
        kron = {f: t[_key(name, f"kron.{f}")] for f in ("S", "A", "B") if _key(name, f"kron.{f}") in t}
        e.factors = kron or None
        if e.weight.dim() == 4:
            e.padding = padding[k]
        entries.append(e)
    return entries, model, block_shape


def _key(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def _conv_padding(model: str) -> tuple:
    from .models import LeNet5

    return LeNet5.conv_padding if model == "lenet5" else ()


def export_run(run_dir, fmt: str = "dense", out=None) -> Path:
    """Export a run folder as `fmt`; out defaults to RUN_DIR/model.FMT.safetensors."""
    check_format(fmt)
    entries, model, block_shape = run_entries(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / f"model.{fmt}.safetensors"
    return write_export(out, entries, {}, fmt, model, block_shape)


def read_export(path) -> tuple[dict, dict[str, Tensor]]:
    """(metadata, tensors) of an export file, without unpickling anything."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"export file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        if META_KEY not in header:
            raise ValueError(f"{path} is not a kronsparse export (no '{META_KEY}' metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header[META_KEY])
    for alias, name in meta.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    return meta, tensors

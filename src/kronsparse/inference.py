"""Inference from an export file: each layer runs its fastest representation for the batch at hand.

A `BlockSparseLinear` holds the dense weight and, for a block-sparse layer, its torch.sparse BSR
matrix and, when the export had them, the Kronecker factors. On the first call with a given number
of rows it times each representation once (after one warm-up call) and keeps the fastest for that
size; `choice` shows what it picked. `representation=` fixes one instead ("dense", "bsr",
"input_first", "factors_first"; a layer that lacks it runs dense).

Loading reads safetensors and JSON only (`export.read_export`): nothing is unpickled. The models of
`kronsparse train` are rebuilt from their export by the application (training/run_folder.load_model).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from . import functional as F
from .blocks import matrix_view
from .export import ExportError, bsr_matrix, from_bsr, read_export
from .functional import kron_weight


def bsr_matmul(bsr: Tensor, x: Tensor) -> Tensor:
    """bsr (out, in) as torch.sparse BSR, times dense x (in, K). torch's kernel where it takes the
    blocks (on CPU, MKL takes square blocks only), else one batched GEMM over the stored blocks."""
    bo, bi = bsr.values().shape[1:]
    if bo == bi or bsr.device.type != "cpu":
        return bsr @ x
    crow, col, values = bsr.crow_indices(), bsr.col_indices(), bsr.values()  # values (nnz, bo, bi)
    rows = torch.repeat_interleave(torch.arange(len(crow) - 1, device=x.device), crow.diff())
    Xb = x.reshape(-1, bi, x.shape[1])[col]  # (nnz, bi, K)
    y = x.new_zeros(len(crow) - 1, bo, x.shape[1])
    return y.index_add_(0, rows, torch.bmm(values, Xb)).reshape(-1, x.shape[1])


def _time_once(fn, x: Tensor) -> float:
    fn(x)  # warm-up
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


class _Choosing(nn.Module):
    """Keeps one callable per representation and picks the fastest per batch size."""

    REPRESENTATIONS = ("auto", "dense", "bsr", "input_first", "factors_first")

    def __init__(self, representation: str = "auto") -> None:
        super().__init__()
        if representation not in self.REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; valid: {', '.join(self.REPRESENTATIONS)}")
        self.representation = representation
        self.choice: dict[int, str] = {}  # rows -> chosen representation

    def candidates(self) -> dict:
        raise NotImplementedError

    def rows(self, x: Tensor) -> int:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        runs = self.candidates()
        if self.representation != "auto":  # a layer off the block grid has only "dense"
            return runs.get(self.representation, runs["dense"])(x)
        n = self.rows(x)
        if n not in self.choice:
            self.choice[n] = min(runs, key=lambda k: _time_once(runs[k], x)) if len(runs) > 1 else next(iter(runs))
        return runs[self.choice[n]](x)


class BlockSparseLinear(_Choosing):
    """y = x Wᵀ + b from a dense W, its BSR matrix (blocksize = block_shape) and/or its factors."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, block_shape=None,
                 factors: dict[str, Tensor] | None = None, representation: str = "auto") -> None:
        super().__init__(representation)
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        self.bsr = bsr_matrix(weight.detach(), self.block_shape) if self.block_shape else None
        self.factors = factors

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def rows(self, x: Tensor) -> int:
        return x.numel() // x.shape[-1]

    def candidates(self) -> dict:
        runs = {"dense": lambda x: nnf.linear(x, self.weight, self.bias)}
        if self.bsr is not None:
            runs["bsr"] = self._bsr
        if self.factors is not None:
            S, A, B = (self.factors[k] for k in ("S", "A", "B"))
            for path in ("input_first", "factors_first"):
                runs[path] = lambda x, p=path: F.kron_linear(x, S, A, B, self.bias, p)
        return runs

    def _bsr(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y = bsr_matmul(self.bsr, x2.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"block_shape={self.block_shape}, factors={self.factors is not None}, "
                f"representation={self.representation}")


class BlockSparseConv2d(_Choosing):
    """nn.Conv2d from a dense weight (out, in, kh, kw) or, with block_shape, its BSR im2col matrix."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, block_shape=None, stride=1, padding=0,
                 representation: str = "auto") -> None:
        super().__init__(representation)
        self.register_buffer("weight", weight.detach().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self.stride, self.padding = tuple(stride) if not isinstance(stride, int) else stride, \
            tuple(padding) if not isinstance(padding, int) else padding
        self.block_shape = tuple(block_shape) if block_shape is not None else None
        self.bsr = None
        if self.block_shape is not None:
            W2, blocks = matrix_view(self.weight, self.block_shape)
            self.bsr = bsr_matrix(W2, blocks)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def rows(self, x: Tensor) -> int:
        return x.shape[0]

    def candidates(self) -> dict:
        runs = {"dense": lambda x: nnf.conv2d(x, self.weight, self.bias, self.stride, self.padding)}
        if self.bsr is not None:
            runs["bsr"] = self._bsr
        return runs

    def _bsr(self, x: Tensor) -> Tensor:
        """im2col, then the BSR matrix times the columns."""
        N, _, H, Wd = x.shape
        kh, kw = self.weight.shape[2:]
        sh, sw = (self.stride, self.stride) if isinstance(self.stride, int) else self.stride
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        cols = nnf.unfold(x, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # (N, in*kh*kw, L)
        Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1
        y = bsr_matmul(self.bsr, cols.transpose(0, 1).reshape(cols.shape[1], -1))  # (out, N*L)
        y = y.view(self.out_channels, N, Ho, Wo).transpose(0, 1)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


def layers_from_export(meta: dict, tensors: dict[str, Tensor], representation: str = "auto") -> dict[str, nn.Module]:
    """name -> BlockSparseLinear / BlockSparseConv2d for every weight layer of an export."""
    layers = {}
    for name, m in meta["layers"].items():
        key = (lambda leaf: f"{name}.{leaf}") if name else (lambda leaf: leaf)
        factors, bias = None, tensors.get(key("bias"))
        if m["stored"] == "factors":
            factors = {k: tensors[key(k)] for k in ("S", "A", "B")}
            r = factors["B"].shape[0]
            W = kron_weight(factors["S"], factors["A"], factors["B"].reshape(r, factors["B"].shape[1], -1))
            W = W.reshape(m["shape"])
        elif m["stored"] == "bsr":
            parts = {k: tensors[key(f"weight.{k}")] for k in ("crow_indices", "col_indices", "values")}
            W = from_bsr(parts, m["shape"]).to_dense().reshape(m["shape"])
        else:
            W = tensors[key("weight")].t().contiguous() if m.get("transposed") else tensors[key("weight")]
        blocks = m["block_shape"] if m["sparse"] else None
        if m["kind"] == "conv2d":
            layers[name] = BlockSparseConv2d(W, bias, blocks, m["stride"], m["padding"], representation)
        else:
            layers[name] = BlockSparseLinear(W, bias, blocks, factors if m["kind"] == "linear" else None,
                                             representation)
    return layers


def load_layers(path, representation: str = "auto") -> dict[str, nn.Module]:
    """The weight layers of an export file (any format), by module name."""
    meta, tensors = read_export(path)
    return layers_from_export(meta, tensors, representation)


def check_ties(path, model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Names of one shared (tied) parameter must get equal tensors: loading would keep only one."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        given = [n for n in group if n in tensors]
        if any(not torch.equal(tensors[given[0]], tensors[n]) for n in given[1:]):
            raise ExportError(f"{path}: {' and '.join(given)} are one tied parameter in the model but differ in the "
                              "export; loading would silently keep one of them")


def replace_layers_(model: nn.Module, path, representation: str = "auto") -> nn.Module:
    """Load an export of `model` (made by export.export_model) into it: each exported weight layer
    becomes a BlockSparseLinear / BlockSparseConv2d, every other tensor is loaded as it is."""
    meta, tensors = read_export(path)
    layers = layers_from_export(meta, tensors, representation)
    owned = set(layers)
    rest = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in owned
            and not any(k.startswith(n + ".weight.") for n in owned)}
    check_ties(path, model, {**rest, **{f"{n}.weight": layer.weight for n, layer in layers.items()}})
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        try:
            setattr(model.get_submodule(parent) if parent else model, child, layer)
        except AttributeError:
            raise ExportError(f"{path}: the model has no submodule {parent!r} for layer {name!r}") from None
    try:
        missing, unexpected = model.load_state_dict(rest, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ExportError(f"{path}: does not fit the model ({str(err).splitlines()[-1].strip()})") from None
    if unexpected:
        raise ValueError(f"export tensors the model does not have: {', '.join(unexpected[:5])}")
    return model

"""What `.weight` of a Kronecker layer answers: the dense weight's shape, dtype and device at no cost,
and W itself the moment it is used.

Model code reads `layer.weight` of the layers it was written for: T5 casts its input to
`self.wo.weight.dtype`, Hugging Face code reads `.weight.device`, and nn.TransformerEncoderLayer's
eval fast path gathers `linear1.weight` to hand to a fused kernel. A property that built W would
build it on every forward; this object builds it only when a tensor is needed. It defines
`__torch_function__`, so `F.linear(x, layer.weight)` gets the real W, and PyTorch's fast paths
(which skip any argument with a torch function) fall back to calling the layer itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map


class LazyWeight:
    """The weight of `layer` (anything with `dense_weight()`), built on use."""

    def __init__(self, layer: nn.Module, shape: tuple[int, ...]) -> None:
        self._layer = layer
        self.shape = torch.Size(shape)

    @property
    def dtype(self) -> torch.dtype:
        return self._layer.S.dtype

    @property
    def device(self) -> torch.device:
        return self._layer.S.device

    @property
    def requires_grad(self) -> bool:
        return self._layer.S.requires_grad

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def materialize(self) -> Tensor:
        """W, differentiable (the layer's dense_weight)."""
        return self._layer.dense_weight()

    def __getattr__(self, name: str):  # any other Tensor attribute or method (.data, .t(), .float()) on W
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(v):
            return v.materialize() if isinstance(v, LazyWeight) else v
        return func(*tree_map(real, args), **tree_map(real, kwargs or {}))

    def __repr__(self) -> str:
        return f"LazyWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

"""The models of the paper's experiments, built from a layer factory so every method shares them."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .functional import check_block_shape
from .layers import KronLinear

LayerFactory = Callable[[int, int], nn.Module]

ARCHITECTURES = {
    "linear": (784, 10),  # the paper's logistic regression
    "mlp": (784, 300, 100, 10),
}


class FeedForward(nn.Module):
    """Linear layers with ReLU between; `layers.K` is the K-th weight layer."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for k, layer in enumerate(self.layers):
            x = layer(x)
            if k < len(self.layers) - 1:
                x = torch.relu(x)
        return x


def tiles(in_features: int, out_features: int, block_shape) -> bool:
    try:
        check_block_shape(out_features, in_features, block_shape)
    except ValueError:
        return False
    return True


def build_model(name: str, factory: LayerFactory, num_features: int = 784, num_classes: int = 10) -> FeedForward:
    """Build `name` ("linear" or "mlp") with factory(in, out) making each weight layer."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(ARCHITECTURES)}")
    sizes = (num_features, *ARCHITECTURES[name][1:-1], num_classes)
    return FeedForward([factory(i, o) for i, o in zip(sizes[:-1], sizes[1:])])


def kron_factory(block_shape, rank: int, path: str = "auto") -> LayerFactory:
    """KronLinear where block_shape tiles the layer, a dense nn.Linear otherwise."""

    def make(i: int, o: int) -> nn.Module:
        if tiles(i, o, block_shape):
            return KronLinear(i, o, block_shape, rank, path=path)
        return nn.Linear(i, o)

    return make


def dense_factory(i: int, o: int) -> nn.Module:
    return nn.Linear(i, o)


def layer_weight(layer: nn.Module) -> Tensor:
    """The dense weight (out, in) of a weight layer of any kind."""
    return layer.dense_weight() if isinstance(layer, KronLinear) else layer.weight


def check_tiles_some_layer(model: FeedForward, block_shape) -> list[int]:
    """Indices of the layers that block_shape tiles; an error when none does."""
    tiled = [k for k, l in enumerate(model.layers) if tiles(l.in_features, l.out_features, block_shape)]
    if not tiled:
        first = model.layers[0]
        check_block_shape(first.out_features, first.in_features, block_shape)  # raises the full message
    return tiled

"""The models of the paper's experiments, built from a layer factory so every method shares them."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..blocks import tiles
from ..layers import KronConv2d, KronLinear, KronSelectLinear
from ..methods.kron import resolve_scale_pin as kron_scale_pin
from .vit import VIT_MODELS, build_vit

LayerFactory = Callable[[int, int], nn.Module]

ARCHITECTURES = {
    "linear": (784, 10),  # the paper's logistic regression
    "mlp": (784, 300, 100, 10),
    "lenet5": None,  # LeNet5 below: conv 1->6 5x5 pad 2, pool, conv 6->16 5x5, pool, fc 400->120->84->10
    **{name: None for name in VIT_MODELS},  # vit.py: a compact ViT ("vit") and DeiT-tiny ("vit-tiny")
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


def build_model(name: str, factory: LayerFactory, num_features: int = 784, num_classes: int = 10) -> FeedForward:
    """Build `name` ("linear", "mlp", "lenet5", "vit" or "vit-tiny") with factory(in, out) making each weight layer
    (and factory.conv(in, out, kernel_size, padding) each conv layer of lenet5)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(ARCHITECTURES)}")
    if name == "lenet5":
        return build_lenet5(factory, num_features, num_classes)
    if name in VIT_MODELS:
        return build_vit(name, factory, num_features, num_classes)
    sizes = (num_features, *ARCHITECTURES[name][1:-1], num_classes)
    return FeedForward([factory(i, o) for i, o in zip(sizes[:-1], sizes[1:])])


def weight_layer_count(name: str) -> int:
    """How many weight layers model `name` has (its `layers`), without building it."""
    if name == "lenet5":
        return 5
    if name in VIT_MODELS:  # the patch embedding, qkv, proj, fc1, fc2 of each block, the head
        return 4 * VIT_MODELS[name].depth + 2
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(ARCHITECTURES)}")
    return len(ARCHITECTURES[name]) - 1


def resolve_scale_pin(pin: str, model: str) -> str:
    """The kron method's scale pin for a run of model `model`: kron's own rule (methods/kron.py) on
    the model's depth ("auto": "decay" on the one-layer linear model, "norm" on every deeper one)."""
    return kron_scale_pin(pin, weight_layer_count(model))


def kron_factory(block_shape, rank: int, path: str = "auto") -> LayerFactory:
    """KronLinear where block_shape tiles the layer, a dense nn.Linear otherwise."""

    def make(i: int, o: int) -> nn.Module:
        if tiles(i, o, block_shape):
            return KronLinear(i, o, block_shape, rank, path=path)
        return nn.Linear(i, o)

    def conv(i: int, o: int, kernel_size: int, padding: int = 0) -> nn.Module:
        if tiles(i, o, block_shape):
            return KronConv2d(i, o, kernel_size, block_shape, rank, padding=padding)
        return nn.Conv2d(i, o, kernel_size, padding=padding)

    make.conv = conv
    return make


def dense_factory(i: int, o: int) -> nn.Module:
    return nn.Linear(i, o)


dense_factory.conv = lambda i, o, kernel_size, padding=0: nn.Conv2d(i, o, kernel_size, padding=padding)


def select_factory(candidates, rank: int, path: str = "auto") -> LayerFactory:
    """KronSelectLinear where every candidate tiles the layer, a dense nn.Linear otherwise (no conv)."""
    if not candidates:
        raise ValueError("method 'select' needs --candidates, e.g. --candidates 2x2,2x8,2x16")

    def make(i: int, o: int) -> nn.Module:
        if all(tiles(i, o, c) for c in candidates):
            return KronSelectLinear(i, o, candidates, rank, path=path)
        return nn.Linear(i, o)

    return make


class LeNet5(nn.Module):
    """LeNet-5: conv 1->6 5x5 pad 2, pool, conv 6->16 5x5, pool, fc 400->120->84->10, ReLU.

    `layers.K` is the K-th weight layer (two convs, then three linears), as in FeedForward;
    `positions[K]` is the number of output positions of layer K (its MACs per sample are
    positions * per-position MACs). Inputs (N, side*side) are reshaped to (N, 1, side, side).
    """

    conv_padding = (2, 0)

    def __init__(self, layers: list[nn.Module], side: int = 28) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.side = side
        s1 = side // 2 - 4  # after pool, conv 5x5 without padding
        self.positions = [side * side, s1 * s1, 1, 1, 1]

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, 1, self.side, self.side)
        for k in (0, 1):
            x = nnf.max_pool2d(torch.relu(self.layers[k](x)), 2)
        x = x.flatten(1)
        for k in (2, 3):
            x = torch.relu(self.layers[k](x))
        return self.layers[4](x)


def build_lenet5(factory: LayerFactory, num_features: int = 784, num_classes: int = 10) -> LeNet5:
    side = math.isqrt(num_features)
    if side * side != num_features or side < 12:
        raise ValueError(f"lenet5 needs square images of side >= 12, got {num_features} features per sample")
    conv = getattr(factory, "conv", None)
    if conv is None:
        raise ValueError("model 'lenet5' needs a method that makes conv layers (every method but select)")
    s2 = (side // 2 - 4) // 2
    layers = [conv(1, 6, 5, padding=2), conv(6, 16, 5), factory(16 * s2 * s2, 120), factory(120, 84),
              factory(84, num_classes)]
    return LeNet5(layers, side)

"""What a run will need in memory, estimated on the meta device before a single tensor is allocated.

A small file can ask for a huge model: an npz of one (1, 6e7) sample makes an MLP whose first layer
has 1.8e10 weights, a large image makes LeNet-5's activations grow with its area. The estimate
counts the dense model's parameters (times the rank for the Kronecker methods, whose fast path may
build W from r terms), four copies of them (weights, gradients, two optimizer states), and the
activations of one batch kept for backward.
"""

from __future__ import annotations

import torch
from torch import nn

from ..limits import env_name, limit
from ..methods import get_method
from .config import TrainConfig
from .models import build_model


class _MetaFactory:
    """Dense layers on the meta device: shapes without storage."""

    device = "meta"  # for the parts of a model not built by the factory (vit.py)

    def __call__(self, in_features: int, out_features: int) -> nn.Module:
        return nn.Linear(in_features, out_features, device="meta")

    def conv(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, device="meta")


def training_bytes(cfg: TrainConfig, num_features: int, num_classes: int, batch: int) -> tuple[int, int, int]:
    """(bytes, parameters, activations per batch) that training `cfg` needs, roughly, in float32."""
    model = build_model(cfg.model, _MetaFactory(), num_features, num_classes)
    params = sum(p.numel() for p in model.parameters())
    activations = [0]

    def count(module, inputs, output) -> None:
        activations[0] += output.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.empty(batch, num_features, device="meta"))
    for h in hooks:
        h.remove()
    terms = cfg.rank * (len(cfg.candidates or ()) or 1) if get_method(cfg.method).trains_factors else 1
    return 4 * (4 * params * terms + 3 * activations[0]), params, activations[0]


def check_training_memory(cfg: TrainConfig, num_features: int, num_classes: int, n_train: int) -> None:
    """ValueError when the estimate is over KRONSPARSE_MAX_TRAIN_BYTES (1 GiB by default)."""
    batch = min(cfg.batch_size, n_train)
    need, params, acts = training_bytes(cfg, num_features, num_classes, batch)
    bound = limit("train_bytes")
    if need > bound:
        raise ValueError(f"training this model would need about {need / 2**30:.1f} GiB ({params} parameters, "
                         f"rank {cfg.rank}, {acts} activations per batch of {batch}), over the limit of "
                         f"{bound / 2**30:.1f} GiB (set {env_name('train_bytes')} to allow more)")

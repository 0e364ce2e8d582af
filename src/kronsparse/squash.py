"""A plain model back out: every Kronecker layer replaced by the module type it replaced.

After `Sparsifier.squash()` (torch.ao.pruning's `squash_mask()` step) the model holds only its
own module types (nn.Linear, nn.Conv2d, transformers' Conv1D) with the exact zero blocks, computes
the same outputs, and saves and loads as the original architecture (`save_pretrained` ->
`from_pretrained` included). Until then, a Hugging Face model that still holds Kronecker layers
warns when saved with `save_pretrained`: its checkpoint stores S, A, B, which `from_pretrained`
does not know, and would load those layers as random weights.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from .layers import KRON_LAYERS, KronConv2d, KronLinear, KronSelectLinear
from .model_tree import replace_module


@torch.no_grad()
def plain_layer(layer: nn.Module, original: type) -> nn.Module:
    """The module of type `original` (nn.Linear, nn.Conv2d or a Conv1D) holding `layer`'s exact dense
    weight and bias; a layer that is not a Kronecker layer as it is."""
    if isinstance(layer, KronConv2d):
        plain = layer.to_conv2d()
    elif isinstance(layer, KronLinear) and original.__name__ == "Conv1D":
        plain = original(layer.out_features, layer.in_features)  # Conv1D(nf, nx): weight (in, out)
        plain.to(device=layer.S.device, dtype=layer.S.dtype)
        plain.weight.copy_(layer.dense_weight().t())
        plain.bias.copy_(layer.bias)  # a Conv1D always has one, so its KronLinear too
    elif isinstance(layer, KronLinear):
        plain = layer.to_linear()
    else:
        return layer
    return plain.train(layer.training)


def squash_(model: nn.Module, originals: dict[str, type]) -> nn.Module:
    """Replace, in place, each named Kronecker layer by its plain `originals[name]` module."""
    for name, original in originals.items():
        layer = model.get_submodule(name)
        if isinstance(layer, KronSelectLinear):
            raise ValueError(f"layer {name!r} is still selecting its block shape: finalize() first")
        new = plain_layer(layer, original)
        if new is not layer:
            replace_module(model, name, new)
    return model


def holds_kron_layers(model: nn.Module) -> bool:
    return any(isinstance(m, (*KRON_LAYERS, KronSelectLinear)) for m in model.modules())


def _guarded_save_pretrained(self, *args, **kwargs):
    if holds_kron_layers(self):
        warnings.warn("kronsparse: this model still holds Kronecker layers (S, A, B); from_pretrained of the "
                      "checkpoint leaves those layers randomly initialised. Call sp.squash() first to save a "
                      "plain model (a checkpoint for resuming this run is fine as it is)", UserWarning, stacklevel=2)
    return type(self).save_pretrained(self, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> None:
    """Make `model.save_pretrained` (a Hugging Face model's) warn while Kronecker layers remain.
    Bound to the instance, so a copy of the model (deepcopy) guards itself."""
    if callable(getattr(type(model), "save_pretrained", None)):
        model.save_pretrained = types.MethodType(_guarded_save_pretrained, model)

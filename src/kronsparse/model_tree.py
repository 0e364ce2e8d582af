"""Finding the layers of any model by name, and replacing them in place."""

from __future__ import annotations

from typing import Callable, Iterable

from torch import Tensor, nn

from .blocks import check_block_shape, tiles
from .layers import KRON_LAYERS, KronSelectLinear

LayerFilter = Callable[[str, nn.Module], bool]
SPARSIFIABLE = (nn.Linear, nn.Conv2d)  # exact types: subclasses (MultiheadAttention's out_proj) are read as .weight


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out): features of a linear layer, channels of a conv layer."""
    if hasattr(layer, "in_channels"):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def layer_weight(layer: nn.Module) -> Tensor:
    """The dense weight (out, in) or (out, in, kh, kw) of a weight layer of any kind."""
    return layer.dense_weight() if hasattr(layer, "dense_weight") else layer.weight


def is_weight_layer(module: nn.Module) -> bool:
    """nn.Linear, nn.Conv2d (groups 1) or a Kronecker layer: what a method can sparsify."""
    if type(module) is nn.Conv2d:
        return module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
    return type(module) in SPARSIFIABLE or isinstance(module, (*KRON_LAYERS, KronSelectLinear))


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every weight layer of `model` by name (the model itself is named ""), in registration order;
    not those inside another (a KronSelectLinear's candidate terms are part of it)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():  # parents come before their children
        inside = any(outer == "" or name.startswith(outer + ".") for outer in found)
        if not inside and is_weight_layer(m):
            found[name] = m
    return found


def layer_tiled(layer: nn.Module, block_shape) -> bool:
    """True when block_shape tiles the layer's (out, in) weight (channels for a conv); a Kronecker
    layer only by its own block shape."""
    if isinstance(layer, KRON_LAYERS):
        return tuple(layer.block_shape) == tuple(block_shape)
    return tiles(*layer_dims(layer), block_shape)


def find_layers(model: nn.Module, block_shape, layers: Iterable[str] | LayerFilter | None = None,
                candidates=None, kinds: tuple = SPARSIFIABLE) -> dict[str, nn.Module]:
    """The layers a method sparsifies, by name.

    layers: None = every weight layer that block_shape tiles (every candidate, for pattern
    selection); a list of names (each must exist and be tiled, or the error says why); or a
    callable (name, module) -> bool choosing among the weight layers that are tiled. kinds: the
    module types the method can work on (exact types for nn.Linear and nn.Conv2d)."""
    shapes = [tuple(c) for c in candidates] if candidates else [tuple(block_shape)]
    fits = lambda m: isinstance(m, KronSelectLinear) or all(layer_tiled(m, s) for s in shapes)  # noqa: E731
    found = {n: m for n, m in weight_layers(model).items()
             if type(m) in kinds or any(k not in SPARSIFIABLE and isinstance(m, k) for k in kinds)}
    if layers is None or callable(layers):
        chosen = {n: m for n, m in found.items() if fits(m) and (layers is None or layers(n, m))}
    else:
        chosen = {}
        for name in layers:
            if name not in found:
                raise ValueError(f"layer {name!r} is not a layer this method can sparsify (candidates: "
                                 f"{', '.join(list(found)[:8]) or 'none'}{', ...' if len(found) > 8 else ''})")
            if not fits(found[name]):
                i, o = layer_dims(found[name])
                raise ValueError(f"block shape {block_shape} does not tile layer {name!r} ({i} -> {o})")
            chosen[name] = found[name]
    if not chosen:
        for m in list(found.values())[:1]:  # the full message of the first layer (it names the shapes that fit)
            i, o = layer_dims(m)
            for shape in shapes:
                check_block_shape(o, i, shape)
        raise ValueError(f"no layer of the model is tiled by block shape {'/'.join(map(str, shapes))} "
                         f"(weight layers: {len(found)})")
    return chosen


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` is in `model` (in place); returns `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return new

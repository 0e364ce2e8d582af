"""Finding the layers of any model by name, and replacing them in place.

A weight layer is nn.Linear, nn.Conv2d (groups 1), a Kronecker layer, or transformers' `Conv1D`
(GPT-2's projections: a Linear whose weight is stored transposed, (in, out)); it is recognised by
its class name, so the library never imports transformers. Everything reads a layer's weight in
nn.Linear's (out, in) order through `layer_dims` and `layer_weight`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .blocks import check_block_shape, tiles
from .layers import KRON_LAYERS, KronSelectLinear
from .sharding import fsdp_wrapped

LayerFilter = Callable[[str, nn.Module], bool]
SPARSIFIABLE = (nn.Linear, nn.Conv2d)  # exact types: subclasses (MultiheadAttention's out_proj) are read as .weight


def plain_type(module: nn.Module) -> type:
    """The module's class, seen through the classes that torch.nn.utils.parametrize and FSDP2's
    fully_shard make on the fly, in either order (block-magnitude's masks make an nn.Linear a
    ParametrizedLinear while it sparsifies; fully_shard makes it an FSDPLinear)."""
    cls, parametrized = type(module), parametrize.is_parametrized(module)
    while True:
        if fsdp_wrapped(cls) is not None:
            cls = fsdp_wrapped(cls)
        elif parametrized:
            cls, parametrized = cls.__bases__[0], False
        else:
            return cls


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): y = x W + b with W stored (in, out)."""
    cls = plain_type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in, out): features of a linear layer, channels of a conv layer."""
    if hasattr(layer, "in_channels"):
        return layer.in_channels, layer.out_channels
    if is_conv1d(layer):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def layer_weight(layer: nn.Module) -> Tensor:
    """The dense weight (out, in) or (out, in, kh, kw) of a weight layer of any kind (a Conv1D's
    as a transposed view)."""
    if hasattr(layer, "dense_weight"):
        return layer.dense_weight()
    return layer.weight.t() if is_conv1d(layer) else layer.weight


def as_linear(layer: nn.Module) -> nn.Module:
    """The layer itself, or for a Conv1D an nn.Linear with its weight (a copy, in (out, in) order)."""
    if not is_conv1d(layer):
        return layer
    W = layer.weight.detach()
    linear = nn.Linear(W.shape[0], W.shape[1], layer.bias is not None, device=W.device, dtype=W.dtype)
    with torch.no_grad():
        linear.weight.copy_(W.t())
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


def layer_kind(module: nn.Module) -> type:
    """The type a method's `layer_kinds` names for the module: nn.Linear for a Conv1D."""
    return nn.Linear if is_conv1d(module) else plain_type(module)


def is_weight_layer(module: nn.Module) -> bool:
    """nn.Linear, nn.Conv2d (groups 1), Conv1D or a Kronecker layer: what a method can sparsify."""
    if plain_type(module) is nn.Conv2d:
        return module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
    return (plain_type(module) in SPARSIFIABLE or is_conv1d(module)
            or isinstance(module, (*KRON_LAYERS, KronSelectLinear)))


def depth(model: nn.Module) -> int:
    """How many layers of the model hold a weight matrix or kernel (any Linear, Conv1D, conv of any
    groups, embedding, attention projection; a Kronecker layer counts once): the model's depth for
    rules that treat a one-layer model apart. Counts the model's layers, not the sparsified ones."""
    count, layers = 0, []  # layers: the weight layers counted, whose insides are part of them
    for name, m in model.named_modules():
        if any(outer == "" or name.startswith(outer + ".") for outer in layers):
            continue  # inside a weight layer already counted (a KronSelectLinear's candidate terms)
        if is_weight_layer(m):
            layers.append(name)
            count += 1
        elif any(p.dim() >= 2 for p in m.parameters(recurse=False)):  # e.g. a ViT's position embedding
            count += 1
    return count


def tied_weights(model: nn.Module) -> dict[str, list[str]]:
    """{module name: the other parameter names its weight is shared with} for every module whose
    `weight` is one Parameter under several names (an output layer tied to the input embedding)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    tied = {}
    for name, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None and len(names.get(id(w), [])) > 1:
            own = f"{name}.weight" if name else "weight"
            tied[name] = [n for n in names[id(w)] if n != own]
    return tied


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
    selection), except layers whose weight is tied to another parameter (left dense: sparsifying
    them would zero blocks of the embedding too); a list of names (each must exist and be tiled,
    or the error says why; a tied layer named here is sparsified, the tie kept); or a callable
    (name, module) -> bool choosing among the untied weight layers that are tiled. kinds: the
    module types the method can work on (exact types for nn.Linear and nn.Conv2d; a Conv1D is
    an nn.Linear)."""
    shapes = [tuple(c) for c in candidates] if candidates else [tuple(block_shape)]
    fits = lambda m: isinstance(m, KronSelectLinear) or all(layer_tiled(m, s) for s in shapes)  # noqa: E731
    found = {n: m for n, m in weight_layers(model).items()
             if layer_kind(m) in kinds or any(k not in SPARSIFIABLE and isinstance(m, k) for k in kinds)}
    if layers is None or callable(layers):
        tied = tied_weights(model)
        chosen = {n: m for n, m in found.items() if fits(m) and n not in tied and (layers is None or layers(n, m))}
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

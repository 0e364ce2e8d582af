"""The contract every training method follows, and the options every method understands.

A method is driven by a `kronsparse.Sparsifier` (or by `kronsparse train`, which uses one):

- `prepare(model, layers)`: the layers it sparsifies, by name (found through `named_modules()`);
  methods that train Kronecker factors get them already swapped in.
- `param_groups(model, weight_decay, lr, optimizer_cls)`: how the optimizer treats each parameter.
- `step(optimizer, step)`: after every `optimizer.step()`: proximal maps, masks, RigL updates. The
  learning rate is read from the optimizer.
- `finalize(optimizer)`: exact zero blocks everywhere (the last top-up, pruning folded into plain
  weights); afterwards the Sparsifier keeps those blocks at zero.

Exact zeros always come from those explicit calls. Every method ends as plain dense weights with
exact zero blocks, and metrics read only those.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from ..blocks import matrix_view
from ..model_tree import find_layers, is_conv1d
from ..sharding import is_sharded, local_part, sharded_grad_hook, sharded_of, zero_where_
from .steering import check_steering

SCOPES = ("layer", "global")
IN_OUT = "_kronsparse_in_out"  # set on a weight stored (in, out) (transformers' Conv1D)


@dataclass
class MethodOptions:
    """What every method understands. A target is per layer by default (`scope="layer"`, as
    torch.ao.pruning's sparsity_level); `scope="global"` reaches it over all layers together."""

    block_shape: tuple[int, int] = (2, 2)  # (bo, bi) in nn.Linear's (out, in) order
    target_sparsity: float | None = None  # fraction of zero blocks to reach (weights for iterative-pruning)
    lam: float | None = None  # penalty strength; with a target, where the "legacy" steering starts (others set it)
    sparsify_fraction: float = 0.7  # share of training that sparsifies; then the mask is frozen
    weight_decay: float | None = None  # None: the method's default (see param_groups)
    scope: str = "layer"
    seed: int = 0
    # proximal methods with a target: how the zeros follow the ramp (methods/steering.py): "track"
    # (threshold from the order statistics of |S| or block norms), "legacy" (lambda from 1e-3, at
    # most 1.05x per 10 steps), "prune" (no penalty: gradual magnitude pruning on the same ramp)
    steering: str = "track"

    def __post_init__(self) -> None:
        self.block_shape = tuple(int(v) for v in self.block_shape)
        if len(self.block_shape) != 2 or min(self.block_shape) < 1:
            raise ValueError(f"block_shape must be two positive sides (bo, bi), got {self.block_shape}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.lam is not None and not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lambda must be finite and >= 0, got {self.lam}")
        if not 0.0 < self.sparsify_fraction <= 1.0:
            raise ValueError(f"sparsify fraction must be in (0, 1], got {self.sparsify_fraction}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown scope {self.scope!r}; valid: {', '.join(SCOPES)}")
        check_steering(self.steering)
        if self.lam is not None and self.target_sparsity is not None and self.steering != "legacy":
            warnings.warn(f"kronsparse: lam={self.lam} is ignored: with a target sparsity the {self.steering!r} "
                          "steering sets lambda itself (steering='legacy' starts from lam; without a target lam is "
                          "fixed)", stacklevel=4)

    @classmethod
    def from_kwargs(cls, method: str, kwargs: dict) -> "MethodOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"method {method!r} has no option {', '.join(unknown)}; its options: "
                            f"{', '.join(sorted(known))}")
        return cls(**kwargs)


def learning_rates(optimizer: torch.optim.Optimizer | None, params: list[Tensor], lr: float | None = None) -> list[float]:
    """The learning rate of each param's group (the proximal threshold is lr * lambda), in one pass over
    the optimizer's groups; `lr` overrides them all (tests without an optimizer).

    Under the Adam family this is not the step an entry takes (lr / sqrt(v_hat) per entry); the
    prox in Adam's metric was tried (threshold lr * lambda / sqrt(v_hat)) and collapsed LeNet-5 under
    Adam (13.4% against 87.2%, 2 epochs on 3,000 MNIST images): with lambda then in gradient units,
    the steering's start (1e-3) is far above a conv net's S gradients. So lambda is steered in
    threshold units under every optimizer, and the final top-up guarantees the target."""
    if lr is not None:
        return [lr] * len(params)
    if optimizer is None:
        raise ValueError("learning_rates needs an optimizer or an lr")
    group_lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    params = [sharded_of(p) for p in params]  # under FSDP2 the optimizer holds the sharded ones
    if any(id(p) not in group_lr for p in params):
        raise ValueError("a sparsified layer's parameter is not in the optimizer: build the optimizer after the "
                         "Sparsifier (it swaps layers), e.g. torch.optim.AdamW(sp.param_groups(), lr=...)"
                         + (", and after fully_shard (it replaces every parameter)" if any(map(is_sharded, params)) else ""))
    return [group_lr[id(p)] for p in params]


# Optimizers whose step is normalised per entry (about lr whatever the gradient's size)
ADAPTIVE_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
                       torch.optim.RAdam, torch.optim.Adagrad, torch.optim.RMSprop)


def with_lr(groups: list[dict], lr: float | None) -> list[dict]:
    """Groups with their learning rate: lr times the group's "lr_scale" (1 if none); unchanged
    without lr. "lr_scale" is dropped either way (optimizers do not know it)."""
    out = []
    for g in groups:
        plain = {k: v for k, v in g.items() if k != "lr_scale"}
        out.append(plain if lr is None else {**plain, "lr": lr * g.get("lr_scale", 1.0)})
    return out


def set_grad_hook(param: Tensor, fn=None) -> None:
    """From now on param's gradient passes through fn(grad) -> grad (None: unchanged). One hook per
    parameter, whose function lives on the parameter: a later method on the same model replaces it.
    A parameter sharded by FSDP2 (or a full copy standing for one, see sharding.py) gets its hook
    where FSDP2 calls it, after the gradient's reduce-scatter."""
    param = sharded_of(param)
    if not getattr(param, "_kronsparse_hooked", False):
        if is_sharded(param):
            param.register_post_accumulate_grad_hook(sharded_grad_hook)
        else:
            param.register_hook(lambda grad: grad if param._kronsparse_grad_fn is None else param._kronsparse_grad_fn(grad))
        param._kronsparse_hooked = True
    param._kronsparse_grad_fn = fn


class GradMask:
    """grad -> grad * mask (mask shaped like the parameter): the hook that keeps pruned entries still.
    On a sharded parameter it multiplies the local gradient chunk by the mask's chunk (kept)."""

    def __init__(self, mask: Tensor) -> None:
        self.mask = mask
        self._local: Tensor | None = None

    def __call__(self, grad: Tensor) -> Tensor:
        return grad * self.mask

    def local(self, param: Tensor) -> Tensor:
        if self._local is None:
            self._local = local_part(param, self.mask)
        return self._local


def mask_grad(param: Tensor, mask: Tensor | None) -> None:
    """From now on param's gradient is zero where `mask` (shaped like param) is False, so no
    optimizer (momentum, Adam's moments) moves a pruned entry."""
    set_grad_hook(param, None if mask is None else GradMask(mask))


class Method:
    """Base: a dense model trained without sparsity (the accuracy ceiling)."""

    name = "dense"
    Options = MethodOptions
    needs_target = False  # True: a target sparsity is required
    default_weight_decay = 0.0
    trains_factors = False  # True: the layers become Kronecker layers (kron, select)
    layer_kinds: tuple = (nn.Linear, nn.Conv2d)  # the modules it works on (model_tree.find_layers)

    def __init__(self, options: MethodOptions, total_steps: int) -> None:
        if self.needs_target and options.target_sparsity is None:
            raise ValueError(f"method {self.name!r} needs a target sparsity")
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.options = options
        self.total_steps = total_steps
        self.sparsify_steps = max(1, int(options.sparsify_fraction * total_steps))
        self.layers: list[nn.Module] = []  # the layers on the block grid
        self.names: list[str] = []
        self.finalized = False

    def swap(self, module: nn.Module) -> nn.Module:
        """The layer this method trains in place of `module` (itself for dense-weight methods)."""
        return module

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
        """Record the layers to sparsify (default: every layer of layer_kinds the block shape tiles)."""
        if layers is None:
            layers = find_layers(model, self.options.block_shape, kinds=self.layer_kinds)
        self.names, self.layers = list(layers), list(layers.values())
        for layer in self.layers:
            if is_conv1d(layer):
                setattr(layer.weight, IN_OUT, True)

    def grid(self, W: Tensor, like: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """A weight (or its gradient; `like`: the weight it belongs to) as the matrix the block grid
        tiles, and that grid's block shape: a conv's (bo, bi) channel blocks are the (bo, bi*kh*kw)
        blocks of its (out, in*kh*kw) view; a Conv1D's weight, stored (in, out), is tiled as stored
        in (bi, bo) blocks (the (bo, bi) blocks of its transpose; its masks and norms come
        transposed, consistently). The matrix is a view, so in-place changes reach W."""
        bo, bi = self.options.block_shape
        if getattr(like if like is not None else W, IN_OUT, False):
            return W, (bi, bo)
        return matrix_view(W, (bo, bi))

    def param_groups(self, model: nn.Module, weight_decay: float | None = None, lr: float | None = None,
                     optimizer_cls: type | None = None) -> list[dict]:
        """Weight decay on weights, never on biases or other vectors (norms). With `lr`, every group
        carries its learning rate (methods that train Kronecker factors give those their own)."""
        wd = self.weight_decay(weight_decay)
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return with_lr([{"params": [p for n, p in params if p.dim() > 1], "weight_decay": wd},
                        {"params": [p for n, p in params if p.dim() <= 1], "weight_decay": 0.0}], lr)

    def weight_decay(self, override: float | None = None) -> float:
        for value in (override, self.options.weight_decay):
            if value is not None:
                return value
        return self.default_weight_decay

    def step(self, optimizer: torch.optim.Optimizer | None, step: int, lr: float | None = None) -> None:
        """Called after optimizer.step() (`lr` overrides the optimizer's: tests without one)."""

    def finalize(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Exact zero blocks everywhere; masks frozen from here on."""
        self.finalized = True

    def squash(self) -> None:
        """Leave plain weights (Sparsifier.squash calls it after finalize): a method that keeps its
        masks as parametrizations removes them here."""

    @torch.no_grad()
    def freeze_zeros(self) -> None:
        """Record every layer's zero weights as frozen (dense-weight methods, at finalize)."""
        self.frozen = [l.weight != 0 for l in self.layers]
        self.apply_frozen()

    @torch.no_grad()
    def apply_frozen(self) -> None:
        """Frozen zeros stay zero: weights re-zeroed, their gradients masked."""
        for layer, keep in zip(self.layers, getattr(self, "frozen", [])):
            zero_where_(layer.weight, ~keep)
            mask_grad(layer.weight, keep)

    def summary(self) -> dict:
        """Method-specific numbers for metrics.json."""
        return {}

    def layer_stats(self) -> dict[str, dict]:
        """Per-layer numbers for Sparsifier.summary(), by layer name (self.names), merged into each
        row's `stats`: how many zero blocks a layer's final top-up made, for the methods that have one."""
        topped = getattr(self, "topped_up_layers", None)
        return {name: {"topped_up_blocks": n} for name, n in zip(self.names, topped)} if topped else {}

    @property
    def block_shape(self) -> tuple[int, int]:
        """The block grid the final weights are measured on (pattern selection may change it)."""
        return self.options.block_shape

    def structure_changed(self) -> bool:
        """True once after the method added or removed parameters (the Sparsifier updates the optimizer)."""
        return False

    def state_dict(self) -> dict:
        return {"finalized": self.finalized, "frozen": [m.clone() for m in getattr(self, "frozen", [])]}

    def load_state_dict(self, state: dict) -> None:
        self.finalized = state.get("finalized", False)
        self.frozen = [m.clone() for m in state.get("frozen", [])]
        self.apply_frozen()

"""Sparsifier: every method of kronsparse on any PyTorch model, in the user's own training loop.

    sp = Sparsifier(model, method="kron", block_shape=(4, 4), rank=4, target_sparsity=0.5, total_steps=N)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    for step in range(N):
        ...; loss.backward(); opt.step(); sp.step(opt)
    sp.finalize()

Shaped like torch.ao.pruning's sparsifiers (prepare on a model, step, squash, state_dict). The layers
come from `named_modules()`: by default every nn.Linear and nn.Conv2d that the block shape tiles.
Methods that train Kronecker factors (kron, select) swap those layers in place when the Sparsifier
is built, so build it before the optimizer.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .functional import block_mask_of
from .blocks import matrix_view
from .methods import get_method
from .model_tree import LayerFilter, find_layers, layer_weight, replace_module


class Sparsifier:
    """Drive one sparsity method on `model`.

    Args:
        model: any nn.Module; changed in place for methods that train Kronecker factors.
        method: a registered name: kron, select, group-lasso, elastic-group-lasso, rigl,
            iterative-pruning, block-magnitude, dense.
        block_shape: (bo, bi) in nn.Linear's (out, in) order (a conv: over its channels).
        total_steps: optimizer steps of the whole run (schedules are fractions of it).
        target_sparsity: fraction of zero blocks to reach in every sparsified layer (scope="global":
            over all of them together); for iterative-pruning, a fraction of weights.
        layers: None (every Linear/Conv2d the block tiles), a list of module names, or a callable
            (name, module) -> bool.
        **options: the method's own options (`get_method(name).Options`), e.g. rank, scale_pin,
            init ("fresh" or "svd"), lam, sparsify_fraction, weight_decay, scope, candidates, steering
            ("track", the default: the penalty follows the ramp; "legacy"; "prune": no penalty).
    """

    def __init__(self, model: nn.Module, method: str = "kron", *, block_shape=(4, 4), total_steps: int,
                 target_sparsity: float | None = None, layers: list[str] | LayerFilter | None = None,
                 **options) -> None:
        cls = get_method(method)
        self.options = cls.Options.from_kwargs(method, {"block_shape": block_shape,
                                                        "target_sparsity": target_sparsity, **options})
        self.method = cls(self.options, total_steps)
        self.model = model
        found = find_layers(model, self.options.block_shape, layers, getattr(self.options, "candidates", None),
                            kinds=cls.layer_kinds)
        self.layers = {name: self._swapped(name, m) for name, m in found.items()}
        self.method.prepare(model, self.layers)
        self.steps = 0

    def _swapped(self, name: str, module: nn.Module) -> nn.Module:
        new = self.method.swap(module)
        if new is module:
            return module
        if not name:
            raise ValueError("the model is itself the layer to swap: wrap it, e.g. nn.Sequential(layer)")
        return replace_module(self.model, name, new)

    @property
    def total_steps(self) -> int:
        return self.method.total_steps

    def param_groups(self, weight_decay: float | None = None, lr: float | None = None,
                     optimizer_cls: type | None = None) -> list[dict]:
        """Parameter groups for the optimizer: weight decay (the method's default if None) on
        weights and Kronecker factors A, B; never on S, biases or norms. With `lr` (and the
        optimizer's class) every group carries its lr: Kronecker factors train at `factor_lr` x lr
        (8x under Adam-type optimizers, see KronOptions). `optimizer()` does all of this."""
        return self.method.param_groups(self.model, weight_decay, lr, optimizer_cls)

    def optimizer(self, optimizer_cls: type, lr: float, weight_decay: float | None = None,
                  **kwargs) -> torch.optim.Optimizer:
        """`optimizer_cls` over this model's parameter groups, e.g.
        `sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)`; kwargs go to the optimizer."""
        return optimizer_cls(self.param_groups(weight_decay, lr, optimizer_cls), lr=lr, **kwargs)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call after every optimizer.step(): proximal maps, masks, mask updates. When the method
        removed parameters (select), they leave the optimizer's groups and state here."""
        self.method.step(optimizer, self.steps)
        if self.method.structure_changed():
            drop_missing_params(optimizer, self.model)
        self.steps += 1

    @torch.no_grad()
    def finalize(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Exact zero blocks everywhere, at the target (topped up if the run ended early); masks
        frozen: later `step` calls keep the zero blocks zero."""
        self.method.finalize(optimizer)
        if optimizer is not None and self.method.structure_changed():
            drop_missing_params(optimizer, self.model)
        share = self.topup_share()
        if share is not None and share["total"] > 0.5:
            warnings.warn(f"kronsparse: the final top-up made {100 * share['total']:.0f}% of the zero blocks (the "
                          "penalty did not reach the target by itself: the run's sparsity is then mostly one "
                          "magnitude pruning step); see Sparsifier.topup_share()", stacklevel=2)

    def topup_share(self) -> dict | None:
        """The share of zero blocks that the final top-up made rather than the penalty:
        {"total": share over all sparsified layers, "layers": {name: share}} (0 where a layer has
        no zero block); None for methods without a top-up or before it ran."""
        layers = getattr(self.method, "topped_up_layers", None)
        if not layers:
            return None
        counts = self._counts("block")
        zeros = [counts[name][0] for name in self.method.names]
        per = {name: (t / z if z else 0.0) for name, t, z in zip(self.method.names, layers, zeros)}
        return {"total": sum(layers) / sum(zeros) if sum(zeros) else 0.0, "layers": per}

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.method.block_shape

    def sparsified_layers(self) -> dict[str, nn.Module]:
        """The sparsified layers by name, as they are in the model now."""
        return {name: self.model.get_submodule(name) for name in self.layers}

    @torch.no_grad()
    def _counts(self, kind: str) -> dict[str, tuple[int, int]]:
        counts = {}
        for name, layer in self.sparsified_layers().items():
            W = layer_weight(layer)
            if kind == "weight":
                counts[name] = (int((W == 0).sum()), W.numel())
            else:
                mask = block_mask_of(*matrix_view(W, self.block_shape))
                counts[name] = (int((~mask).sum()), mask.numel())
        return counts

    def layer_sparsity(self, kind: str = "block") -> dict[str, float]:
        """{layer name: fraction of zero blocks (kind="weight": zero weights)}, from the dense weights."""
        return {n: z / t for n, (z, t) in self._counts(kind).items()}

    def block_sparsity(self, kind: str = "block") -> float:
        """Zero blocks / blocks over all sparsified layers (kind="weight": zero weights / weights)."""
        counts = self._counts(kind).values()
        return sum(z for z, _ in counts) / sum(t for _, t in counts)

    def summary(self) -> dict:
        return self.method.summary()

    def state_dict(self) -> dict:
        """Everything of the Sparsifier's to resume mid-run (the model and optimizer have their own)."""
        return {"steps": self.steps, "method": self.method.state_dict()}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore; a method that restructures the model (select) does so first, so the model's
        state_dict loads after this. Pass the optimizer to drop parameters that no longer exist
        (before loading its state_dict)."""
        self.method.load_state_dict(state["method"])
        self.steps = state["steps"]
        if self.method.structure_changed() and optimizer is not None:
            drop_missing_params(optimizer, self.model)


def drop_missing_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Remove from the optimizer's groups and state every parameter that left the model."""
    alive = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        gone = [p for p in group["params"] if id(p) not in alive]
        group["params"] = [p for p in group["params"] if id(p) in alive]
        for p in gone:
            optimizer.state.pop(p, None)

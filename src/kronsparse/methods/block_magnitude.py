"""Gradual block magnitude pruning with torch.ao.pruning's WeightNormSparsifier.

The sparsifier zeroes the (bo, bi) blocks of smallest L2 norm: `sparse_block_shape` is (rows, cols)
of the weight, which for nn.Linear's (out, in) weight is exactly our (bo, bi), and the blocks start
at index 0, so they are our grid (tests check this); `zeros_per_block = bo*bi` zeroes whole blocks.
It blocks only the last two dims, which for a conv weight (out, in, kh, kw) are the kernel, so
BlockSparsifier hands it every weight as its matrix view (out, in*kh*kw) with each layer's blocks
(bo, bi*kh*kw): the (bo, bi) channel blocks, the kernel whole, as metrics measure them.
Its level follows a cubic ramp (Zhu & Gupta 2017) over the sparsifying phase (70% of training by
default), updated every `interval` steps and set exactly to the target's block count (rounded up)
at the phase's last step; then the mask is frozen. The weight is parametrised as original * mask,
so pruned blocks get no gradient, and `finalize` calls `squash_mask()`, which leaves a plain
`weight` with exact zero blocks (same Parameter object, so the optimizer is unaffected), kept zero.

Under FSDP2 (sharding.py) the parametrization stays to the end: removing it would take the weight
out of FSDP's hands. `finalize` then folds the mask into `parametrizations.weight.original` (exact
zero blocks there too) and keeps it frozen. An unsharded model that loads this state (and the full
weights) loses the parametrization at `Sparsifier.squash`.

The sparsity is per layer (WeightNormSparsifier has no global level, so scope "global" is refused). The masks are saved by this
method's state_dict, not the model's (see BlockMask).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.ao.pruning import FakeSparsity, WeightNormSparsifier

from ..sharding import STANDS_FOR, zero_where_
from .base import Method
from .schedules import CubicSchedule
from .steering import count_for


class BlockMask(FakeSparsity):
    """FakeSparsity (weight * mask) with a non-persistent mask. FakeSparsity leaves its mask out of
    the model's state_dict but still expects it on load, so a prepared model could not be reloaded;
    here the mask is saved by the method's state_dict instead."""

    def __init__(self, mask: Tensor) -> None:
        nn.Module.__init__(self)
        self.register_buffer("mask", mask, persistent=False)


class BlockSparsifier(WeightNormSparsifier):
    """WeightNormSparsifier (L2) on the matrix view of each weight; the mask keeps the weight's shape."""

    def __init__(self) -> None:
        super().__init__(sparsity_level=0.0, norm=lambda W: (W * W).flatten(1))

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs) -> None:
        super().update_mask(module, tensor_name, **kwargs)  # the mask of the matrix view
        mask = getattr(module.parametrizations, tensor_name)[0].mask
        mask.data = mask.data.view(getattr(module.parametrizations, tensor_name).original.shape)


class BlockMagnitudeMethod(Method):
    name = "block-magnitude"
    needs_target = True
    interval = 10  # steps between mask updates

    def __init__(self, options, total_steps: int) -> None:
        super().__init__(options, total_steps)
        if options.scope != "layer":
            raise ValueError("method 'block-magnitude' reaches its target per layer only (scope='layer')")
        self.schedule = CubicSchedule(options.target_sparsity, self.sparsify_steps)
        self.sparsifier = BlockSparsifier()
        self.squashed = False

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
        super().prepare(model, layers)
        blocks = [self.grid(l.weight)[1] for l in self.layers]
        self.sparsifier.prepare(model, config=[{"tensor_fqn": f"{name}.weight", "parametrization": BlockMask,
                                                "sparse_block_shape": (bo, bi), "zeros_per_block": bo * bi}
                                               for name, (bo, bi) in zip(self.names, blocks)])

    def _masks(self) -> list[Tensor]:
        return [l.parametrizations.weight[0].mask for l in self.layers]

    def set_level(self, step: int) -> None:
        for group, layer in zip(self.sparsifier.groups, self.layers):
            bo, bi = group["sparse_block_shape"]
            blocks = layer.weight.numel() // (bo * bi)
            level = self.schedule(step + 1)
            if step >= self.sparsify_steps - 1:  # exactly the target's count: the sparsifier rounds
                level = count_for(self.schedule.final, blocks) / blocks
            group["sparsity_level"] = level

    @torch.no_grad()
    def step(self, optimizer, step: int, lr: float | None = None) -> None:
        if self.finalized:
            self.apply_frozen()
            return
        last = step == self.sparsify_steps - 1
        if step < self.sparsify_steps and (step % self.interval == 0 or last):
            self.set_level(step)
            self.sparsifier.step()

    @torch.no_grad()
    def finalize(self, optimizer=None) -> None:
        if not self.finalized:
            if self.sparsifier.groups and self.sparsifier.groups[0]["sparsity_level"] < self.schedule.final:
                self.set_level(self.sparsify_steps - 1)  # a run stopped early still ends at its target
                self.sparsifier.step()
            self.squash()
            self.freeze_zeros()
        self.finalized = True

    def squash(self) -> None:
        if self.squashed:
            return
        if self._sharded():  # fold the mask into the weight, keep the parametrization (module doc)
            for layer, mask in zip(self.layers, self._masks()):
                layer.parametrizations.weight.original.mul_(mask)
            return
        self.sparsifier.squash_mask()
        self.squashed = True

    def _sharded(self) -> bool:
        """True inside the Sparsifier's gathering of FSDP2-sharded weights (full copies stand in for them)."""
        return any(hasattr(l.parametrizations.weight.original, STANDS_FOR) for l in self.layers
                   if hasattr(l, "parametrizations"))

    @torch.no_grad()
    def apply_frozen(self) -> None:
        if self.squashed:
            return super().apply_frozen()
        for layer, keep in zip(self.layers, getattr(self, "frozen", [])):  # the mask zeroes the gradient
            zero_where_(layer.parametrizations.weight.original, ~keep)

    @torch.no_grad()
    def freeze_zeros(self) -> None:
        if self.squashed:
            return super().freeze_zeros()
        self.frozen = [l.parametrizations.weight.original != 0 for l in self.layers]
        self.apply_frozen()

    def summary(self) -> dict:
        return {"final_level": self.sparsifier.groups[0]["sparsity_level"] if self.sparsifier.groups else 0.0}

    def state_dict(self) -> dict:
        masks = [] if self.squashed else [m.clone() for m in self._masks()]
        return {**super().state_dict(), "masks": masks, "levels": [g["sparsity_level"] for g in self.sparsifier.groups],
                "squashed": self.squashed}

    def load_state_dict(self, state: dict) -> None:
        for group, level in zip(self.sparsifier.groups, state["levels"]):
            group["sparsity_level"] = level
        if state["squashed"]:
            self.squash()
            super().load_state_dict(state)
            return
        for mask, saved in zip(self._masks(), state["masks"]):
            mask.data = saved.clone()
        super().load_state_dict(state)  # finalized with the parametrization kept: the sharded case

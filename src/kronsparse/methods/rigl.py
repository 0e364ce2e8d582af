"""Block-wise RigL (Evci et al. 2020) on the (bo, bi) block grid .

A block mask at a fixed block sparsity (--target-sparsity), random at the start, the same fraction
in every layer (the global count is exact). Every delta_T = 100 steps until 75% of training, each
layer drops its active blocks of smallest ||W_g|| and grows as many inactive blocks with the largest
dense-gradient norm ||dL/dW_g||; the drop fraction is alpha * (1 + cos(pi * t / T_end)) / 2,
alpha = 0.3. With block (1, 1) this is plain RigL.

Masking, the cheapest correct way: the model trains a dense W whose masked entries are exactly zero,
so its gradient is RigL's dense gradient. The invariant is "a masked entry has weight 0 and optimizer
state 0": a gradient hook on every weight keeps the dense gradient on update steps (the grow scores),
then zeroes the gradient of masked entries, so SGD, momentum, Adam and weight decay all leave them
at 0; a mask update zeroes the dropped blocks' weights and optimizer state. Grown blocks therefore
start at exactly zero with zero state. `step` re-zeroes masked weights anyway (a no-op unless an
optimizer moves zero-gradient entries). The target is per layer (scope "global": the global count,
split over layers in proportion to their size).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import block_norms, expand_block_mask
from ..sharding import is_sharded, local_part, sharded_of, zero_where_
from .base import Method, set_grad_hook
from .schedules import CosineDecay, Every
from .steering import count_for, select


def update_block_mask(mask: Tensor, drop: Tensor, grow: Tensor) -> Tensor:
    """(mask minus drop) plus grow, checking RigL's invariants."""
    if (drop & grow).any():
        raise AssertionError("RigL: dropped and grown blocks overlap")
    if (drop & ~mask).any() or (grow & mask).any():
        raise AssertionError("RigL: dropped blocks must be active and grown blocks inactive")
    new = (mask & ~drop) | grow
    if int(new.sum()) != int(mask.sum()):
        raise AssertionError(f"RigL: active blocks changed from {int(mask.sum())} to {int(new.sum())}")
    return new


def reset_optimizer_state(optimizer: torch.optim.Optimizer, param: Tensor, entries: Tensor) -> None:
    """Zero every per-entry state tensor (momentum buffer, Adam moments) of `param` at `entries`
    (under FSDP2: of the sharded parameter, each rank its chunk)."""
    param = sharded_of(param)
    for value in optimizer.state.get(param, {}).values():
        if torch.is_tensor(value) and value.shape == param.shape:
            if is_sharded(value):
                value.to_local().masked_fill_(local_part(value, entries), 0)
            else:
                value.masked_fill_(entries, 0)


def layer_zero_counts(total_zeros: int, sizes: list[int]) -> list[int]:
    """Split `total_zeros` over layers in proportion to their sizes (largest remainder)."""
    total = sum(sizes)
    exact = [total_zeros * n / total for n in sizes]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda k: counts[k] - exact[k])
    for k in order[: total_zeros - sum(counts)]:
        counts[k] += 1
    return counts


class RigLMethod(Method):
    name = "rigl"
    needs_target = True
    alpha = 0.3  # initial drop fraction
    delta_t = 100  # steps between mask updates
    end_fraction = 0.75  # of training; no updates after

    def __init__(self, options, total_steps: int) -> None:
        super().__init__(options, total_steps)
        t_end = int(self.end_fraction * total_steps)
        self.drop_fraction = CosineDecay(self.alpha, t_end)
        self.is_update = Every(self.delta_t, t_end)
        self.generator = torch.Generator().manual_seed(options.seed)
        self.masks: list[Tensor] = []  # per layer, (m1, n1), True = active block
        self.pruned: list[Tensor] = []  # per layer, shaped like its weight, True = masked entry
        self.grads: list[Tensor | None] = []  # dense gradients of an update step (the grow scores)
        self.next_step = 0  # the step whose backward runs now
        self.updates = 0

    def layer_zeros(self, sizes: list[int]) -> list[int]:
        target = self.options.target_sparsity
        if self.options.scope == "global":
            return layer_zero_counts(count_for(target, sum(sizes)), sizes)
        return [count_for(target, n) for n in sizes]

    @torch.no_grad()
    def prepare(self, model: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
        super().prepare(model, layers)
        shapes = [block_norms(*self.grid(l.weight)).shape for l in self.layers]  # (m1, n1) per layer
        sizes = [m1 * n1 for m1, n1 in shapes]
        zeros = self.layer_zeros(sizes)
        self.masks = []
        for layer, shape, n, z in zip(self.layers, shapes, sizes, zeros):
            mask = torch.ones(n, dtype=torch.bool, device=layer.weight.device)
            mask[torch.randperm(n, generator=self.generator)[:z].to(mask.device)] = False
            self.masks.append(mask.view(shape))
        self._expand()
        self._apply_masks()
        self.grads = [None] * len(self.layers)
        for k, layer in enumerate(self.layers):
            set_grad_hook(layer.weight, self._grad_hook(k))

    def _grad_hook(self, k: int):
        def hook(grad: Tensor) -> Tensor:
            if self.is_update(self.next_step) and not self.finalized:  # accumulates over micro-batches
                self.grads[k] = grad.detach().clone() if self.grads[k] is None else self.grads[k] + grad
            return grad.masked_fill(self.pruned[k], 0)
        return hook

    def _expand(self) -> None:
        """Cache the element masks of the pruned entries (recomputed when the block masks change)."""
        self.pruned = [self._expand_like(l.weight, ~m) for l, m in zip(self.layers, self.masks)]

    def _expand_like(self, W: Tensor, mask: Tensor) -> Tensor:
        """Block mask (m1, n1) -> element mask shaped like W (a conv's: over the whole kernel)."""
        return expand_block_mask(mask, self.grid(W)[1]).view_as(W)

    def _apply_masks(self) -> None:
        for layer, pruned in zip(self.layers, self.pruned):
            zero_where_(layer.weight, pruned)

    @torch.no_grad()
    def step(self, optimizer, step: int, lr: float | None = None) -> None:
        if self.is_update(step) and not self.finalized and all(g is not None for g in self.grads):
            self.update_masks(optimizer, self.drop_fraction(step))
        self.grads = [None] * len(self.layers)
        self.next_step = step + 1
        self._apply_masks()

    @torch.no_grad()
    def finalize(self, optimizer=None) -> None:
        self._apply_masks()
        self.finalized = True

    @torch.no_grad()
    def update_masks(self, optimizer: torch.optim.Optimizer, fraction: float) -> None:
        """Drop the `fraction` of active blocks with smallest norm, grow as many by gradient norm."""
        for k, (layer, mask) in enumerate(zip(self.layers, self.masks)):
            active = int(mask.sum())
            n = min(int(fraction * active), mask.numel() - active)
            if n == 0:
                continue
            drop = select([torch.where(mask, block_norms(*self.grid(layer.weight)), math.inf)], n, largest=False)[0]
            scores = block_norms(*self.grid(self.grads[k], layer.weight))
            grow = select([torch.where(mask, -math.inf, scores)], n, largest=True)[0]
            self.masks[k] = update_block_mask(mask, drop, grow)
            dropped = self._expand_like(layer.weight, drop)
            layer.weight.masked_fill_(dropped, 0)
            if optimizer is not None:
                reset_optimizer_state(optimizer, layer.weight, dropped)
        self._expand()
        self.updates += 1

    def summary(self) -> dict:
        return {"mask_updates": self.updates}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masks": [m.clone() for m in self.masks], "updates": self.updates,
                "next_step": self.next_step, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.next_step = state["next_step"]
        self.masks = [m.clone() for m in state["masks"]]
        self._expand()
        self.updates = state["updates"]
        self.generator.set_state(state["generator"])

"""Group LASSO on the dense weight over the (bo, bi) block grid (METHOD.md §5).

Penalty lambda * sum_g sqrt(bo*bi) * ||W_g||_F, applied by its exact proximal map after every
optimizer step while sparsifying: W_g <- W_g * max(1 - lr*lambda*sqrt(bo*bi) / ||W_g||, 0), so
blocks become exactly zero. A conv layer's blocks are those of its matrix view (Method.grid):
(bo, bi*kh*kw), so its groups are weighted by sqrt(bo*bi*kh*kw), their size.

Decision: while sparsifying this is plain proximal SGD, so a zero block may revive when its
gradient step outgrows the threshold (keeping pruned blocks pruned would turn the penalty into
greedy pruning). At the end of the sparsifying phase the mask is frozen, as kron does: the zero
blocks are re-zeroed after every later step.

With --target-sparsity, lambda is steered toward a cubic ramp (reached at 60% of the sparsifying
phase), the number of zero blocks never exceeds the ramp (the excess blocks of largest norm skip
the shrink for that step), and the smallest active blocks are pruned at the end of the phase if
the target is not reached, so the final block sparsity is the target (methods/steering.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import block_mask_of, block_norms, expand_block_mask, group_lasso_penalty, group_shrink
from .base import CubicSchedule, Method
from .steering import LambdaSteering, SteeredState, count_for, select


class GroupLassoMethod(SteeredState, Method):
    name = "group-lasso"
    initial_lambda = 1e-3  # where steering starts when only a target is given

    def __init__(self, cfg, total_steps: int) -> None:
        super().__init__(cfg, total_steps)
        if cfg.target_sparsity is None and cfg.lam is None:
            raise ValueError(f"method {self.name!r} needs --target-sparsity or --lambda")
        self.lam = cfg.lam if cfg.lam is not None else self.initial_lambda
        self.steering = None
        if cfg.target_sparsity is not None:
            self.steering = LambdaSteering(CubicSchedule(cfg.target_sparsity, int(0.6 * self.sparsify_steps)),
                                           self.lam)
        self.masks: list[Tensor] = []  # empty while sparsifying; the frozen block masks afterwards
        self.topped_up = 0

    # -- the penalty and its proximal map --------------------------------------------------

    def prox(self, W: Tensor, threshold: float, block_shape=None) -> Tensor:
        """Proximal map of threshold * sum_g sqrt(bo*bi) * ||W_g||_F (blocks: block_shape or the config's)."""
        bo, bi = block_shape or self.cfg.block_shape
        return group_shrink(W, (bo, bi), threshold * math.sqrt(bo * bi))

    def penalty_value(self) -> float:
        """lambda * the penalty on the current weights (for metrics; the loss never sees it)."""
        return self.lam * sum(group_lasso_penalty(*self.grid(l.weight)).item() for l in self.layers)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return sum(block_mask_of(*self.grid(l.weight)).numel() for l in self.layers)

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer, step: int, lr: float) -> None:
        if self.masks:
            self._apply_masks()
            return
        self._prox(lr * self.lam, step)
        if step >= self.sparsify_steps - 1:
            self._freeze()

    def _prox(self, threshold: float, step: int) -> None:
        grids = [self.grid(l.weight) for l in self.layers]
        bss = [bs for _, bs in grids]
        old = [w.detach().clone() for w, _ in grids]
        new = [self.prox(w, threshold, bs) for w, bs in zip(old, bss)]
        zero = [~block_mask_of(w, bs) for w, bs in zip(new, bss)]
        wanted = sum(int(z.sum()) for z in zero)
        if self.steering is not None:
            excess = wanted - self.steering.allowed(step, self.num_blocks)
            if excess > 0:  # keep the newly zeroed blocks of largest norm as they were
                scores = [torch.where(z & block_mask_of(w, bs), block_norms(w, bs), -1.0)
                          for z, w, bs in zip(zero, old, bss)]
                keep = select(scores, excess, largest=True)
                new = [torch.where(expand_block_mask(k, bs), o, n) for k, o, n, bs in zip(keep, old, new, bss)]
            self.steering.update(step, wanted, self.num_blocks)
            self.lam = self.steering.lam
        for (w, _), n in zip(grids, new):
            w.copy_(n)

    def _freeze(self) -> None:
        """Freeze the block mask; with a target, prune the smallest active blocks to reach it."""
        grids = [self.grid(l.weight) for l in self.layers]
        self.masks = [block_mask_of(w, bs) for w, bs in grids]
        if self.steering is not None:
            zeros = sum(int((~m).sum()) for m in self.masks)
            missing = count_for(self.steering.schedule.final, self.num_blocks) - zeros
            if missing > 0:
                norms = [torch.where(m, block_norms(w, bs), math.inf) for (w, bs), m in zip(grids, self.masks)]
                drop = select(norms, missing, largest=False)
                self.masks = [m & ~d for m, d in zip(self.masks, drop)]
                self.topped_up = missing
        self._apply_masks()

    def _apply_masks(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            W, bs = self.grid(layer.weight)
            W.masked_fill_(~expand_block_mask(mask, bs), 0)

    def summary(self) -> dict:
        return {"final_lambda": self.lam, "final_penalty": self.penalty_value(), "topped_up_blocks": self.topped_up}

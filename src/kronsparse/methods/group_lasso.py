"""Group LASSO on the dense weight over the (bo, bi) block grid .

Penalty lambda * sum_g sqrt(bo*bi) * ||W_g||_F, applied by its exact proximal map after every
optimizer step while sparsifying: W_g <- W_g * max(1 - lr*lambda*sqrt(bo*bi) / ||W_g||, 0), so
blocks become exactly zero. A conv layer's blocks are those of its matrix view (Method.grid):
(bo, bi*kh*kw), so its groups are weighted by sqrt(bo*bi*kh*kw), their size.

Decision: with a fixed lambda (no target) or the "legacy" steering, while sparsifying this is plain
proximal SGD, so a zero block may revive when its gradient step outgrows the threshold (keeping
pruned blocks pruned would turn a fixed penalty into greedy pruning). At the end of the sparsifying
phase the mask is frozen, as kron does: the zero blocks are re-zeroed after every later step.

With a target sparsity, lambda is steered toward a cubic ramp (reached at 60% of the sparsifying
phase), per layer by default (scope "global": one lambda for the model), the number of zero blocks
never exceeds the ramp (the excess blocks of largest norm skip the shrink for that step), and the
smallest active blocks are pruned at the end of the phase if the target is not reached, so the
final block sparsity is the target (methods/steering.py). The threshold is lr * lambda with the
optimizer's lr (methods/base.learning_rates). With the default steering ("track": the threshold
from the order statistics of the block norms) a zero block stays zero while sparsifying: with
revival, a fall of the threshold revived most of a layer's zero blocks within a few steps (SGD's
momentum and Adam's steps push a zeroed block out again), and the zeros could not follow the ramp;
`steering="legacy"` keeps the revival described above.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import block_mask_of, block_norms, expand_block_mask, group_lasso_penalty, group_shrink
from ..sharding import zero_where_
from .base import Method, learning_rates, mask_grad
from .schedules import CubicSchedule
from .steering import TargetSteering


class GroupLassoMethod(Method):
    name = "group-lasso"
    initial_lambda = 1e-3  # where steering starts when only a target is given

    def __init__(self, options, total_steps: int) -> None:
        super().__init__(options, total_steps)
        if options.target_sparsity is None and options.lam is None:
            raise ValueError(f"method {self.name!r} needs a target sparsity or a lambda")
        self.lam = options.lam if options.lam is not None else self.initial_lambda
        self.steering: TargetSteering | None = None
        self.masks: list[Tensor] = []  # empty while sparsifying; the frozen block masks afterwards
        self.topped_up = 0
        self.topped_up_layers: list[int] = []  # per layer, for topup_share()
        self.held: list[Tensor] = []  # the zero blocks after the last prox ("track" steering)

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
        super().prepare(model, layers)
        if self.options.target_sparsity is not None:
            sizes = [block_mask_of(*self.grid(l.weight)).numel() for l in self.layers]
            self.steering = TargetSteering(CubicSchedule(self.options.target_sparsity, int(0.6 * self.sparsify_steps)),
                                           sizes, self.lam, self.options.scope, mode=self.options.steering)

    # -- the penalty and its proximal map --------------------------------------------------

    def prox(self, W: Tensor, threshold, block_shape=None) -> Tensor:
        """Proximal map of threshold * sum_g sqrt(bo*bi) * ||W_g||_F (blocks: block_shape or the options')."""
        bo, bi = block_shape or self.options.block_shape
        return group_shrink(W, (bo, bi), threshold * math.sqrt(bo * bi))

    def lams(self) -> list[float]:
        return self.steering.lams if self.steering is not None else [self.lam] * len(self.layers)

    def penalty_value(self) -> float:
        """lambda * the penalty on the current weights (for metrics; the loss never sees it)."""
        return sum(lam * group_lasso_penalty(*self.grid(l.weight)).item() for lam, l in zip(self.lams(), self.layers))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return sum(block_mask_of(*self.grid(l.weight)).numel() for l in self.layers)

    @torch.no_grad()
    def step(self, optimizer, step: int, lr: float | None = None) -> None:
        if self.finalized or step >= self.sparsify_steps:
            self._apply_masks()
            return
        steps = learning_rates(optimizer, [l.weight for l in self.layers], lr)
        self._prox(steps, step)
        if step >= self.sparsify_steps - 1:
            self.finalize(optimizer)

    def _prox(self, steps: list, step: int) -> None:
        grids = [self.grid(l.weight) for l in self.layers]
        old = [w.detach().clone() for w, _ in grids]
        # "track": a zero block stays zero while sparsifying (with revival, a fall of the threshold
        # revived most of a layer's zero blocks at once under SGD's momentum and Adam's steps)
        held = self.held if self.steering is not None and self.steering.mode == "track" else []
        norms = [block_norms(w, bs) for w, bs in grids]
        norms = [n.masked_fill(h, 0.0) for n, h in zip(norms, held)] if held else norms
        if self.steering is not None:  # "track": the threshold from the order statistics of the block norms
            self.steering.track(step, norms, [s * math.sqrt(bs[0] * bs[1]) for s, (_, bs) in zip(steps, grids)])
        new = [self.prox(w, s * lam, bs) for w, s, lam, (_, bs) in zip(old, steps, self.lams(), grids)]
        if held:
            new = [n.masked_fill(expand_block_mask(h, bs), 0) for n, h, (_, bs) in zip(new, held, grids)]
        zero = [~block_mask_of(w, bs) for w, (_, bs) in zip(new, grids)]
        if self.steering is not None:
            self.steering.update(step, [int(z.sum()) for z in zero])
            # blocks zero before this step score lowest, so the cap never keeps them (a block whose
            # norm underflows to 0 after the step is not one of them: it may be kept)
            scores = ([n.masked_fill(h, -1.0) for n, h in zip(norms, held)] if held else
                      [torch.where(block_mask_of(w, bs), n, -1.0) for n, (w, bs) in zip(norms, zip(old, (b for _, b in grids)))])
            keep = self.steering.keep_excess(step, zero, scores)
            if keep is not None:  # the newly zeroed blocks of largest norm keep their value this step
                new = [torch.where(expand_block_mask(k, bs), o, n) for k, o, n, (_, bs) in zip(keep, old, new, grids)]
            drop = self.steering.floor(step, [block_mask_of(w, bs) for w, (_, bs) in zip(new, grids)],
                                       [block_norms(w, bs) for w, (_, bs) in zip(new, grids)])
            if drop is not None:  # "prune": the blocks of smallest norm up to the ramp
                new = [w.masked_fill(expand_block_mask(d, bs), 0) for w, d, (_, bs) in zip(new, drop, grids)]
            self.lam = self.steering.lams[0]
        for (w, _), n in zip(grids, new):
            w.copy_(n)
        if self.steering is not None and self.steering.mode == "track":
            self.held = [~block_mask_of(w, bs) for w, (_, bs) in zip(new, grids)]

    @torch.no_grad()
    def finalize(self, optimizer=None) -> None:
        """Freeze the block mask; with a target, prune the smallest active blocks to reach it."""
        if not self.finalized:
            grids = [self.grid(l.weight) for l in self.layers]
            self.masks = [block_mask_of(w, bs) for w, bs in grids]
            if self.steering is not None:
                drop = self.steering.top_up(self.masks, [block_norms(w, bs) for w, bs in grids])
                self.masks = [m & ~d for m, d in zip(self.masks, drop)]
                self.topped_up_layers = [int(d.sum()) for d in drop]
                self.topped_up = sum(self.topped_up_layers)
            self.finalized = True
        self._apply_masks()

    @torch.no_grad()  # also called from load_state_dict, outside the no_grad of step and finalize
    def _apply_masks(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            bs = self.grid(layer.weight)[1]
            zero = ~expand_block_mask(mask, bs)  # (out, in) or a conv's matrix view: as the weight's
            zero_where_(layer.weight, zero.view(layer.weight.shape))
            mask_grad(layer.weight, (~zero).view(layer.weight.shape))

    def summary(self) -> dict:
        lams = self.lams()
        return {"final_lambda": lams[0] if len(set(lams)) <= 1 else list(lams), "final_penalty": self.penalty_value(),
                "topped_up_blocks": self.topped_up, "steering": self.options.steering}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lam": self.lam, "masks": [m.clone() for m in self.masks],
                "topped_up": self.topped_up, "topped_up_layers": list(self.topped_up_layers),
                "held": [h.clone() for h in self.held], "steering": self.steering.state_dict() if self.steering else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lam, self.topped_up = state["lam"], state["topped_up"]
        self.topped_up_layers = list(state.get("topped_up_layers", []))
        self.held = [h.clone() for h in state.get("held", [])]
        self.masks = [m.clone() for m in state["masks"]]
        if self.steering is not None:
            self.steering.load_state_dict(state["steering"])
        if self.masks:
            self._apply_masks()

"""Iterative unstructured magnitude pruning, with torch.nn.utils.prune.

Magnitude pruning of single weights of every layer on the block grid (each layer to the target by
default; scope "global": the smallest weights across all layers), in `rounds` = 5 rounds
at the ends of five equal slices of the sparsifying phase, each to the cubic schedule's level
(Zhu & Gupta 2017), reaching --target-sparsity (a fraction of weights, rounded up) in the last round;
training between rounds fine-tunes the survivors. Each round is L1Unstructured pruning
(prune.global_unstructured): the weight becomes weight_orig * weight_mask, recomputed before every
forward, so pruned weights get no gradient. `finalize` folds the mask into a plain `weight` with
exact zeros (prune.remove: same Parameter object, so the optimizer is unaffected) and keeps them zero.

Block sparsity is whatever unstructured pruning happens to leave; metrics report both.
To resume: `load_state_dict` first (it re-applies the masks), then the model's, then the optimizer's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from .base import Method
from .schedules import CubicSchedule, Rounds
from .steering import count_for


class IterativePruningMethod(Method):
    name = "iterative-pruning"
    needs_target = True
    rounds = 5

    def __init__(self, options, total_steps: int) -> None:
        super().__init__(options, total_steps)
        self.schedule = CubicSchedule(options.target_sparsity, self.sparsify_steps)
        self.is_round = Rounds(self.rounds, self.sparsify_steps)
        self.removed = False

    def _masks(self) -> list[Tensor | None]:
        return [getattr(l, "weight_mask", None) for l in self.layers]

    def pruned_weights(self) -> int:
        return sum(int((m == 0).sum()) for m in self._masks() if m is not None)

    @torch.no_grad()
    def step(self, optimizer, step: int, lr: float | None = None) -> None:
        if self.finalized:
            self.apply_frozen()
        elif self.is_round(step):
            self.prune_to(self.schedule(step + 1))

    @torch.no_grad()
    def finalize(self, optimizer=None) -> None:
        if not self.finalized:
            self.prune_to(self.schedule.final)  # a run stopped early still ends at its target
            self.remove()
            self.freeze_zeros()
        self.finalized = True

    def prune_to(self, fraction: float) -> None:
        """Prune the smallest surviving weights until `fraction` of them is pruned (in every layer,
        or over all layers together with scope "global")."""
        groups = [[l] for l in self.layers] if self.options.scope == "layer" else [self.layers]
        for layers in groups:
            masks = [getattr(l, "weight_mask", None) for l in layers]
            pruned = sum(int((m == 0).sum()) for m in masks if m is not None)
            amount = count_for(fraction, sum(l.weight.numel() for l in layers)) - pruned
            if amount <= 0 or self.removed:
                continue
            current = {(l, "weight"): self._current(l) for l in layers}  # `weight` is one step stale
            prune.global_unstructured(list(current), pruning_method=prune.L1Unstructured,
                                      importance_scores=current, amount=amount)

    @staticmethod
    def _current(layer: nn.Module) -> Tensor:
        if hasattr(layer, "weight_orig"):
            return layer.weight_orig * layer.weight_mask
        return layer.weight

    def remove(self) -> None:
        """Fold the masks into plain weights with exact zeros."""
        for layer in self.layers:
            if prune.is_pruned(layer):
                prune.remove(layer, "weight")
        self.removed = True

    def summary(self) -> dict:
        return {"pruned_weights": self.pruned_weights() if not self.removed else
                sum(int((l.weight == 0).sum()) for l in self.layers)}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "masks": [None if m is None else m.clone() for m in self._masks()],
                "removed": self.removed}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for layer, mask in zip(self.layers, state["masks"]):
            if mask is not None and not prune.is_pruned(layer):
                prune.custom_from_mask(layer, "weight", mask.clone())
            elif mask is not None:
                layer.weight_mask.copy_(mask)
        if state["removed"]:
            self.remove()

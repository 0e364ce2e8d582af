"""Iterative unstructured magnitude pruning (METHOD.md §5), with torch.nn.utils.prune.

Global magnitude pruning of single weights of every layer on the block grid, in `rounds` = 5 rounds
at the ends of five equal slices of the sparsifying phase, each to the cubic schedule's level
(Zhu & Gupta 2017), reaching --target-sparsity (a fraction of weights, rounded up) in the last round;
training between rounds fine-tunes the survivors. Each round is prune.global_unstructured with
L1Unstructured: the weight becomes weight_orig * weight_mask, recomputed before every forward, so
pruned weights get no gradient. At the last step of training prune.remove folds the mask into a
plain `weight` with exact zeros (same Parameter object, so the optimizer is unaffected).

Block sparsity is whatever unstructured pruning happens to leave; metrics report both.
To resume: `load_state_dict` first (it re-applies the masks), then the model's, then the optimizer's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from .base import CubicSchedule, Method
from .schedules import Rounds
from .steering import count_for


class IterativePruningMethod(Method):
    name = "iterative-pruning"
    needs_target = True
    rounds = 5

    def __init__(self, cfg, total_steps: int) -> None:
        super().__init__(cfg, total_steps)
        self.schedule = CubicSchedule(cfg.target_sparsity, self.sparsify_steps)
        self.is_round = Rounds(self.rounds, self.sparsify_steps)
        self.removed = False

    def _masks(self) -> list[Tensor | None]:
        return [getattr(l, "weight_mask", None) for l in self.layers]

    def pruned_weights(self) -> int:
        return sum(int((m == 0).sum()) for m in self._masks() if m is not None)

    @property
    def num_weights(self) -> int:
        return sum(l.weight.numel() for l in self.layers)

    @torch.no_grad()
    def after_step(self, model: nn.Module, optimizer, step: int, lr: float) -> None:
        if self.is_round(step):
            self.prune_to(count_for(self.schedule(step + 1), self.num_weights))
        if step == self.total_steps - 1:
            self.remove()

    def prune_to(self, zeros: int) -> None:
        """Prune the smallest surviving weights, across all layers, until `zeros` are pruned."""
        amount = zeros - self.pruned_weights()
        if amount <= 0 or self.removed:
            return
        current = {(l, "weight"): self._current(l) for l in self.layers}  # `weight` is one step stale
        prune.global_unstructured(list(current), pruning_method=prune.L1Unstructured, importance_scores=current,
                                  amount=amount)

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
        return {"masks": [None if m is None else m.clone() for m in self._masks()], "removed": self.removed}

    def load_state_dict(self, state: dict) -> None:
        for layer, mask in zip(self.layers, state["masks"]):
            if mask is not None and not prune.is_pruned(layer):
                prune.custom_from_mask(layer, "weight", mask.clone())
            elif mask is not None:
                layer.weight_mask.copy_(mask)
        if state["removed"]:
            self.remove()

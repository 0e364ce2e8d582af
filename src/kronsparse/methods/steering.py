"""Reaching an exact target block sparsity with a penalty: steer lambda, cap the zeros, top up.

Shared by the proximal methods (the paper's kron method, Group LASSO, Elastic Group LASSO). With
scope "layer" every layer has its own lambda, cap and top-up (|S| and block norms are not comparable
across layers, and one global cap could switch a whole small layer off); with scope "global" one
lambda, one cap and one top-up span all layers.

Every `interval` steps lambda is multiplied by exp(gain * (ramp(t) - zero_fraction)), the factor
bounded by `max_factor`; the ramp's value at t also caps how many blocks may be zero (the caller's
excess blocks of largest score keep their value for that step); when the sparsifying phase ends,
the smallest active blocks are pruned if the target is not reached (`top_up`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


def count_for(fraction: float, total: int) -> int:
    """How many of `total` items a fraction means: rounded up, so the fraction is always reached."""
    return math.ceil(fraction * total - 1e-9)


def select(scores: list[Tensor], k: int, largest: bool) -> list[Tensor]:
    """Bool masks shaped like `scores` marking the k entries of largest (or smallest) score across all."""
    flat = torch.cat([s.flatten() for s in scores])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[torch.topk(flat, k, largest=largest).indices] = True
    return [part.view_as(s) for part, s in zip(chosen.split([s.numel() for s in scores]), scores)]


def log_step(value: float, error: float, gain: float, max_factor: float = 1.05, lo: float = 1e-6,
             hi: float = 10.0) -> float:
    """Multiplicative controller step: value * exp(gain * error), the factor limited to
    [1/max_factor, max_factor] (no wind-up while the response lags), the value to [lo, hi]."""
    factor = min(max_factor, max(1.0 / max_factor, math.exp(gain * error)))
    return min(hi, max(lo, value * factor))


@dataclass
class TargetSteering:
    """Per-layer (or one global) lambda steered so the zero fraction follows `schedule`.

    sizes: blocks per layer. `lams` holds one lambda per layer (all equal with scope "global")."""

    schedule: object  # step -> fraction (CubicSchedule or DelayedCubic)
    sizes: list[int]
    lam: float
    scope: str = "layer"
    interval: int = 10
    gain: float = 4.0
    max_factor: float = 1.05  # per update; faster steering collapsed S in short MLP runs (all blocks
    # shrink together and the ReLU network died: 11% on MNIST after 2 epochs at a 1.09 factor)
    lams: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.lams:
            self.lams = [self.lam] * len(self.sizes)

    @property
    def final(self) -> float:
        return self.schedule.final

    def _groups(self) -> list[list[int]]:
        """Layer indices that share a lambda, a cap and a top-up."""
        return [[k] for k in range(len(self.sizes))] if self.scope == "layer" else [list(range(len(self.sizes)))]

    def update(self, step: int, zeros: list[int]) -> None:
        """Steer lambda from the zeros the penalty wants (before the cap), every `interval` steps."""
        if step % self.interval:
            return
        for group in self._groups():
            fraction = sum(zeros[k] for k in group) / sum(self.sizes[k] for k in group)
            lam = log_step(self.lams[group[0]], self.schedule(step) - fraction, self.gain, self.max_factor)
            for k in group:
                self.lams[k] = lam

    def keep_excess(self, step: int, zero: list[Tensor], scores: list[Tensor]) -> list[Tensor] | None:
        """Where the zeros `zero` exceed the ramp's cap: masks of the zeroed entries of largest score
        that keep their value this step (None when nothing exceeds). Entries already zero before
        must score lowest (the caller gives them -1 or 0), so they are never picked."""
        keep = [torch.zeros_like(z) for z in zero]
        any_kept = False
        for group in self._groups():
            allowed = count_for(self.schedule(step), sum(self.sizes[k] for k in group))
            excess = sum(int(zero[k].sum()) for k in group) - allowed
            if excess > 0:
                chosen = select([torch.where(zero[k], scores[k], -1.0) for k in group], excess, largest=True)
                for k, c in zip(group, chosen):
                    keep[k] = c
                any_kept = True
        return keep if any_kept else None

    def top_up(self, active: list[Tensor], norms: list[Tensor]) -> list[Tensor]:
        """Masks of the active blocks of smallest norm to prune so every group reaches the target."""
        drop = [torch.zeros_like(a) for a in active]
        for group in self._groups():
            zeros = sum(int((~active[k]).sum()) for k in group)
            missing = count_for(self.final, sum(self.sizes[k] for k in group)) - zeros
            if missing > 0:
                chosen = select([torch.where(active[k], norms[k], math.inf) for k in group], missing, largest=False)
                for k, c in zip(group, chosen):
                    drop[k] = c
        return drop

    def state_dict(self) -> dict:
        return {"lams": list(self.lams)}

    def load_state_dict(self, state: dict) -> None:
        self.lams = list(state["lams"])

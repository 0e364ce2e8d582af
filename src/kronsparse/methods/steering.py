"""Reaching an exact target block sparsity with a penalty: steer lambda, cap the zeros, top up.

Shared by the proximal methods: Group LASSO and Elastic Group LASSO steer one lambda for the whole
model, the paper's method (kron.py) one per layer with `next_lambda`. Every `interval` steps lambda is multiplied by
exp(gain * (ramp(t) - zero_fraction)); the ramp's value at t also caps how many blocks may be zero
(the caller keeps the excess blocks of largest norm); the caller tops up with the smallest blocks
if the target is not reached when the sparsifying phase ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import CubicSchedule, log_step


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


@dataclass
class LambdaSteering:
    """lambda, steered so the zero fraction follows `schedule`; `allowed` is the cap at each step."""

    schedule: CubicSchedule
    lam: float
    interval: int = 10
    gain: float = 4.0
    max_factor: float = 1.05  # per update; faster steering collapsed S in short MLP runs (all blocks
    # shrink together and the ReLU network died: 11% on MNIST after 2 epochs at a 1.09 factor)

    def allowed(self, step: int, total: int) -> int:
        return count_for(self.schedule(step), total)

    def next_lambda(self, step: int, lam: float, zeros: int, total: int) -> float:
        """`lam` after this step's update (unchanged between updates)."""
        if step % self.interval:
            return lam
        return log_step(lam, self.schedule(step) - zeros / total, self.gain, self.max_factor)

    def update(self, step: int, zeros: int, total: int) -> None:
        self.lam = self.next_lambda(step, self.lam, zeros, total)


class SteeredState:
    """state_dict / load_state_dict of a method that steers `lam` and keeps block `masks`."""

    lam: float
    steering: LambdaSteering | None
    masks: list
    topped_up: int

    def state_dict(self) -> dict:
        return {"lam": self.lam, "masks": [m.clone() for m in self.masks], "topped_up": self.topped_up}

    def load_state_dict(self, state: dict) -> None:
        self.lam = state["lam"]
        if self.steering is not None:
            self.steering.lam = state["lam"]
        self.masks = [m.clone() for m in state["masks"]]
        self.topped_up = state["topped_up"]

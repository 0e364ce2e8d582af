"""The schedules of every method: each maps a step to a number or a yes/no, holds no state, and so
needs no state_dict."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineDecay:
    """f(t) = initial * (1 + cos(pi * t / end)) / 2 for t < end, then 0 (RigL's drop fraction)."""

    initial: float
    end: int

    def __call__(self, step: int) -> float:
        if step >= self.end:
            return 0.0
        return self.initial * 0.5 * (1.0 + math.cos(math.pi * step / self.end))


@dataclass(frozen=True)
class Every:
    """True at steps interval, 2*interval, ... that lie before `end` (never at step 0)."""

    interval: int
    end: int

    def __call__(self, step: int) -> bool:
        return 0 < step < self.end and step % self.interval == 0


@dataclass(frozen=True)
class Rounds:
    """True at the last step of each of `count` equal slices of [0, span): one pruning round each."""

    count: int
    span: int

    def steps(self) -> list[int]:
        return sorted({max(0, round(k * self.span / self.count) - 1) for k in range(1, self.count + 1)})

    def __call__(self, step: int) -> bool:
        return step in self.steps()


@dataclass(frozen=True)
class CubicSchedule:
    """Sparsity s(t) = final * (1 - (1 - t/ramp)^3) for t < ramp, then final (Zhu & Gupta 2017)."""

    final: float
    ramp_steps: int

    def __call__(self, step: int) -> float:
        if self.ramp_steps <= 0 or step >= self.ramp_steps:
            return self.final
        return self.final * (1.0 - (1.0 - step / self.ramp_steps) ** 3)


@dataclass(frozen=True)
class DelayedCubic:
    """CubicSchedule(final, ramp_steps) started at step `start` (0 before)."""

    final: float
    start: int
    ramp_steps: int

    def __call__(self, step: int) -> float:
        return CubicSchedule(self.final, self.ramp_steps)(step - self.start) if step >= self.start else 0.0

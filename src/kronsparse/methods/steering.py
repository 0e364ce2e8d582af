"""Reaching an exact target block sparsity with a penalty: steer lambda, cap the zeros, top up.

Shared by the proximal methods (the paper's kron method, Group LASSO, Elastic Group LASSO). With
scope "layer" every layer has its own lambda, cap and top-up (|S| and block norms are not comparable
across layers, and one global cap could switch a whole small layer off); with scope "global" one
lambda, one cap and one top-up span all layers.

Three modes (`STEERINGS`, the methods' `steering` option):

- "track" (the default): every `interval` steps the per-step threshold is set from the order
  statistics of the scores the penalty shrinks (|S| for kron, block norms for group lasso): the
  k-th smallest score, k the ramp's count `interval` steps ahead, divided by `interval`, so that
  block reaches zero by then if the gradient does not hold it up (if it does, it is still above
  zero at the next update and the threshold follows it). The scale of lambda comes from the
  model and the optimizer's lr (lambda = threshold / lr), not from a constant start, so the
  penalty does the pruning in runs of any length under SGD and Adam alike.
- "legacy" (the steering before issue 26): lambda starts at the method's `initial_lambda` (or the
  given lam) and every `interval` steps is multiplied by exp(gain * (ramp(t) - zero_fraction)),
  the factor bounded by `max_factor`. Growing it 1000-fold takes about 1,400 steps, so in short
  runs the final top-up does most of the pruning.
- "prune": no penalty (lambda 0); every `interval` steps the active blocks of smallest score are
  pruned up to the ramp: gradual magnitude pruning of S (kron) or of the blocks (group lasso),
  the ablation that says what the penalty adds.

In every mode the ramp's value at t caps how many blocks may be zero (the caller's excess blocks of
largest score keep their value for that step), and when the sparsifying phase ends the smallest
active blocks are pruned if the target is not reached (`top_up`, a last resort).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

STEERINGS = ("track", "legacy", "prune")


def check_steering(mode: str) -> None:
    if mode not in STEERINGS:
        raise ValueError(f"unknown steering {mode!r}; valid: {', '.join(STEERINGS)}")

def count_for(fraction: float, total: int) -> int:
    """How many of `total` items a fraction means: rounded up, so the fraction is always reached."""
    return math.ceil(fraction * total - 1e-9)


def sorted_at(values: np.ndarray, at: int) -> float:
    """The entry at index `at` of `values` sorted ascending (NaN last): numpy's sort, not its partition.
    Introselect slows down 5-15x on an array with one value repeated many times, which is what the
    steering sees along the ramp (the zero scores of pruned blocks, the filler of entries that cannot
    be chosen): 290 against 57 us on 58,800 entries, 31,000 of them zero, and 240 against 17 us when
    most are one filler (torch 2.13, numpy 2.4, one thread). On distinct values the sort takes 110 us
    to introselect's 40. Either gives the same number: the value at `at` of the sorted array."""
    return float(np.sort(values)[at])


def kth_smallest(values: Tensor, k: int) -> float:
    """The k-th smallest entry of `values` (k from 1), torch.kthvalue's value, from a CPU copy by
    `sorted_at`: torch.kthvalue took 700 us on 58,800 entries, and the "track" steering takes one per
    layer and step along the ramp. The k-th smallest is one number whichever algorithm finds it (NaN
    counts as largest in both)."""
    return sorted_at(values.detach().reshape(-1).float().cpu().numpy(), k - 1)


def by_value(flat: Tensor, k: int, largest: bool) -> Tensor | None:
    """The k largest (smallest) entries of a 1-d `flat` as a bool mask, where their values alone decide
    them: none of the entries equal to the k-th is left out (else None, and topk's order among the
    tied decides). From the k-th value (`sorted_at`) and two comparisons: 10x faster than torch.topk
    with a large k on 58,800 entries (the "track" steering caps the zeros of every layer at every step)."""
    values = flat.detach().cpu().numpy()
    if k > values.size or np.isnan(values).any():
        return None
    kth = sorted_at(values, values.size - k if largest else k - 1)
    beyond = flat > kth if largest else flat < kth
    tied = flat == kth
    return beyond | tied if int(beyond.sum()) + int(tied.sum()) == k else None


def where_filled(mask: Tensor, values: Tensor, filler: float) -> Tensor:
    """torch.where(mask, values, filler), for a finite filler, without torch.where's branch per entry:
    on the cap's mask (about half of 58,800 entries True, scattered) that took 165 us against 44 for
    values * m plus or minus a term that is the filler where m is 0 and a zero of the sign that
    leaves every value as it is (-0.0 + x and x - 0.0 are x, -0.0 included) where m is 1 (m: the mask in
    values' dtype; torch 2.13, one thread). Exact wherever `values` is finite; an inf or NaN makes
    the sum of the result inf or NaN, and then torch.where answers (as where a finite sum overflows).
    On a GPU torch.where is branch-free already, and reading the sum would wait for the device."""
    if values.device.type != "cpu":
        return torch.where(mask, values, filler)
    m = mask.to(values.dtype, copy=True)  # changed in place below
    out = values * m
    if filler < 0:
        out.add_(m.neg_().add_(1).mul_(filler))  # (1 - m) * filler: -0.0 where m is 1
    else:
        out.sub_(m.sub_(1).mul_(filler))  # (m - 1) * filler: +0.0 where m is 1
    return out if math.isfinite(float(out.sum())) else torch.where(mask, values, filler)


def select(scores: list[Tensor], k: int, largest: bool) -> list[Tensor]:
    """Bool masks shaped like `scores` marking the k entries of largest (or smallest) score across all
    (as torch.topk picks them; by value where that decides, `by_value`)."""
    flat = torch.cat([s.flatten() for s in scores])
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        cpu_float = flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64)
        exact = by_value(flat, k, largest) if cpu_float else None  # on a GPU topk is fast and copies nothing
        if exact is not None:
            chosen = exact
        else:
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
    mode: str = "track"
    # "track": per group, a multiplier on the order-statistic threshold for what it cannot see (the
    # gradient holding blocks up, a zero group lasso block reviving); steered like legacy lambda,
    # but faster, since it only corrects a threshold that already has the right scale
    gains: list[float] = field(default_factory=list)
    track_max_factor: float = 2.0
    track_every: int = 1
    track_fall: float = 0.9

    def __post_init__(self) -> None:
        check_steering(self.mode)
        if self.mode == "prune":
            self.lam = 0.0
        if not self.lams:
            self.lams = [self.lam] * len(self.sizes)
        if not self.gains:
            self.gains = [1.0] * len(self.sizes)

    @property
    def final(self) -> float:
        return self.schedule.final

    def _groups(self) -> list[list[int]]:
        """Layer indices that share a lambda, a cap and a top-up."""
        return [[k] for k in range(len(self.sizes))] if self.scope == "layer" else [list(range(len(self.sizes)))]

    def update(self, step: int, zeros: list[int]) -> None:
        """Every `interval` steps, from the zeros the penalty wants (before the cap): "legacy" steers
        lambda, "track" the multiplier on its threshold."""
        if self.mode == "prune" or step % self.interval:
            return
        values, factor, lo, hi = ((self.lams, self.max_factor, 1e-6, 10.0) if self.mode == "legacy"
                                  else (self.gains, self.track_max_factor, 1.0, 1e3))
        for group in self._groups():
            fraction = sum(zeros[k] for k in group) / sum(self.sizes[k] for k in group)
            value = log_step(values[group[0]], self.schedule(step) - fraction, self.gain, factor, lo, hi)
            for k in group:
                values[k] = value

    def track(self, step: int, scores: list[Tensor], units: list[float]) -> None:
        """"track", every `track_every` steps: lambda per layer from the order statistics of `scores`
        (what the prox shrinks, 0 where already zero; or a callable returning them, called only when
        an order statistic is taken). `units[k]`: how far layer k's scores drop per
        unit of lambda in one step (lr for kron's |S|, lr * sqrt(bo*bi) for group lasso's norms).
        The threshold is the k-th smallest score over `interval`, k the ramp's count `interval`
        steps ahead: what brings that block to zero by then if the gradient does not hold it up
        (the multiplier `gains` makes up for what it does)."""
        if self.mode != "track" or step % self.track_every:
            return
        need = None
        for group in self._groups():
            total = sum(self.sizes[k] for k in group)
            k = min(count_for(self.schedule(step + self.interval), total), total)
            threshold = 0.0
            if k > 0:  # before the ramp (k = 0) the scores are not needed: not even built
                need = need or [s.detach() / self.interval for s in (scores() if callable(scores) else scores)]
                threshold = kth_smallest(torch.cat([need[j].flatten() for j in group]), k)
            for j in group:  # falls at most by track_fall per step: a sudden drop let SGD's momentum revive
                # most of a group lasso layer's zero blocks at once (38% -> 3% in 3 steps, a one-layer toy)
                lam = self.gains[j] * threshold / units[j] if units[j] > 0 else 0.0
                self.lams[j] = max(lam, self.track_fall * self.lams[j])

    def floor(self, step: int, active: list[Tensor], scores: list[Tensor]) -> list[Tensor] | None:
        """"prune", every `interval` steps: masks of the active blocks of smallest score to prune so
        every group reaches the ramp (None at other steps and in the other modes)."""
        if self.mode != "prune" or step % self.interval:
            return None
        return self.top_up(active, scores, self.schedule(step))

    def keep_excess(self, step: int, zero, scores, counts: list[int] | None = None) -> list[Tensor] | None:
        """Where the zeros `zero` exceed the ramp's cap: masks of the zeroed entries of largest score
        that keep their value this step (None when nothing exceeds). Entries already zero before
        must score lowest (the caller gives them -1 or 0), so they are never picked. `zero` and
        `scores`: lists, or callables returning them (called only when some group exceeds, which
        then needs `counts`: the number of True in each of `zero`)."""
        counts = counts if counts is not None else [int(z.sum()) for z in zero]
        keep = None
        for group in self._groups():
            allowed = count_for(self.schedule(step), sum(self.sizes[k] for k in group))
            excess = sum(counts[k] for k in group) - allowed
            if excess > 0:
                zero = zero() if callable(zero) else zero
                scores = scores() if callable(scores) else scores
                keep = keep or [torch.zeros_like(z) for z in zero]
                chosen = select([where_filled(zero[k], scores[k], -1.0) for k in group], excess, largest=True)
                for k, c in zip(group, chosen):
                    keep[k] = c
        return keep

    def top_up(self, active: list[Tensor], norms: list[Tensor], fraction: float | None = None) -> list[Tensor]:
        """Masks of the active blocks of smallest norm to prune so every group reaches `fraction`
        (default: the target)."""
        fraction = self.final if fraction is None else fraction
        drop = [torch.zeros_like(a) for a in active]
        for group in self._groups():
            zeros = sum(int((~active[k]).sum()) for k in group)
            missing = count_for(fraction, sum(self.sizes[k] for k in group)) - zeros
            if missing > 0:
                chosen = select([torch.where(active[k], norms[k], math.inf) for k in group], missing, largest=False)
                for k, c in zip(group, chosen):
                    drop[k] = c
        return drop

    def state_dict(self) -> dict:
        return {"lams": list(self.lams), "gains": list(self.gains)}

    def load_state_dict(self, state: dict) -> None:
        self.lams[:] = list(state["lams"])  # in place: a method may hold the same list
        self.gains[:] = list(state.get("gains", [1.0] * len(self.sizes)))

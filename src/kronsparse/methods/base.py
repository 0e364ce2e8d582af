"""The contract every training method follows, and the small schedules they share.

A method builds its model's layers (`layer_factory`), says how the optimizer treats each parameter
(`param_groups`), may add a penalty to the loss, and acts on the model around `optimizer.step()`:
`before_step` sees the gradients, `after_step` applies proximal maps or masks. Exact zeros always
come from those explicit calls. Every method ends as plain dense weights with exact zero blocks,
and metrics read only those.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..layers import matrix_view
from ..models import LayerFactory, check_tiles_some_layer, dense_factory


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


class Method:
    """Base: a dense model trained without sparsity (the accuracy ceiling)."""

    name = "dense"
    needs_target = False  # True: --target-sparsity is required
    default_weight_decay = 0.0

    def __init__(self, cfg: TrainConfig, total_steps: int) -> None:
        if self.needs_target and cfg.target_sparsity is None:
            raise ValueError(f"method {self.name!r} needs --target-sparsity")
        self.cfg = cfg
        self.total_steps = total_steps
        self.sparsify_steps = max(1, int(cfg.sparsify_fraction * total_steps))
        self.layers: list[nn.Module] = []  # the layers on the block grid

    def layer_factory(self) -> LayerFactory:
        return dense_factory

    def prepare(self, model: nn.Module) -> None:
        """Record the layers on the block grid (all that block_shape tiles)."""
        self.layers = [model.layers[k] for k in check_tiles_some_layer(model, self.cfg.block_shape)]

    def grid(self, W: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """A weight (or its gradient) as the matrix the block grid tiles, and that grid's block shape:
        a conv's (bo, bi) channel blocks are the (bo, bi*kh*kw) blocks of its (out, in*kh*kw) view.
        The matrix is a view, so in-place changes reach W."""
        return matrix_view(W, self.cfg.block_shape)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Weight decay on weights (never on biases)."""
        wd = self.weight_decay()
        decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
        rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
        return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]

    def weight_decay(self) -> float:
        return self.default_weight_decay if self.cfg.weight_decay is None else self.cfg.weight_decay

    def penalty(self, model: nn.Module) -> Tensor | None:
        """A term added to the task loss (None: no term)."""
        return None

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called after backward, before optimizer.step()."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, lr: float) -> None:
        """Called after optimizer.step(): proximal maps, masks, pruning."""

    def summary(self) -> dict:
        """Method-specific numbers for metrics.json."""
        return {}

    @property
    def block_shape(self) -> tuple[int, int]:
        """The block grid the final weights are measured on (pattern selection may change it)."""
        return self.cfg.block_shape

    def structure_changed(self) -> bool:
        """True once after the method added or removed parameters: the loop rebuilds the optimizer."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def log_step(value: float, error: float, gain: float, max_factor: float = 1.05, lo: float = 1e-6,
             hi: float = 10.0) -> float:
    """Multiplicative controller step: value * exp(gain * error), the factor limited to
    [1/max_factor, max_factor] (no wind-up while the response lags), the value to [lo, hi]."""
    factor = min(max_factor, max(1.0 / max_factor, math.exp(gain * error)))
    return min(hi, max(lo, value * factor))

"""The paper's method: W = sum_i kron(S * A_i, B_i), l1 on S with its proximal map (METHOD.md §3).

After every optimizer step S <- soft_threshold(S, lr * lambda), so blocks become exactly zero, and
pruned blocks stay pruned. Weight decay on A and B (not on S) pins the scale so the penalty cannot
be undone by growing A.

With a target sparsity P, lambda is steered, for every layer separately: every `interval` steps the
fraction of the layer's blocks the prox wants zero is compared with a cubic ramp toward P (reached
at 60% of the sparsifying phase) and the layer's lambda is multiplied by exp(gain * error). The
layers of a deep model need different lambdas (the MLP with the "norm" pin below ended at 0.010,
0.016 and 0.065). The number of zero blocks never exceeds the
ramp's current value, in every layer separately: when the prox would zero more, the blocks with the largest
|S| keep their value for that step. If a layer has not reached P when the sparsifying phase ends,
its active blocks with the smallest norm are pruned to reach it. Then the mask is frozen for the rest of training.

Two ways keep the scale from escaping into A (METHOD.md §3, the pitfall), chosen by cfg.scale_pin
("auto", the default, picks "decay" for the one-layer linear model and "norm" for deeper ones:
`config.resolve_scale_pin`):

- "decay": weight decay on A and B. S starts at 1 everywhere, so the prox shrinks every
  block alike and no block reaches zero until lambda is large; then many fall at once, with S near 0
  (the "cliff" of METHOD.md). On the one-layer model this works (its argmax does not care that all
  logits shrink together; it is what the README's table uses, 0.2-0.5 points above "norm"); a deep
  ReLU model loses 8 points (MLP, 10 epochs, 2x2: 90.42% vs 98.15% with "norm").
- "norm": while sparsifying, every block's A[:, p, q] is rescaled to unit norm after each step and
  S[p, q] takes the norm (S*A, hence W, unchanged). |S[p, q]| is then the size of block (p, q), the
  prox removes the smallest blocks first and sparsity follows the ramp instead of falling off a
  cliff. The ramp starts at 25% of the sparsifying phase, once the sizes mean something (measured:
  starting at 0 cost 0.3-0.5 points on the linear model).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import resolve_scale_pin
from ..functional import block_norms, soft_threshold
from ..layers import KRON_LAYERS, matrix_view
from ..models import LayerFactory, kron_factory
from .base import DelayedCubic, Method
from .steering import LambdaSteering, SteeredState, count_for, select


class KronMethod(SteeredState, Method):
    name = "kron"
    default_weight_decay = 1e-3  # on A and B only; see METHOD.md §3 for why 1e-4 fails
    initial_lambda = 1e-3  # where steering starts when only a target is given

    def __init__(self, cfg, total_steps: int) -> None:
        super().__init__(cfg, total_steps)
        # a target steers lambda from the given value (or a small start); without one lambda is fixed
        self.lam = (cfg.lam or self.initial_lambda) if cfg.target_sparsity is not None else (cfg.lam or 0.0)
        self.pin = resolve_scale_pin(cfg.scale_pin, cfg.model)
        self.steering = None
        if cfg.target_sparsity is not None:
            ramp_end = int(0.6 * self.sparsify_steps)
            start = int(0.25 * self.sparsify_steps) if self.pin == "norm" else 0
            self.steering = LambdaSteering(DelayedCubic(cfg.target_sparsity, start, ramp_end - start), self.lam)
        self.masks: list[Tensor] = []
        self.lams: list[float] = []  # one lambda per layer, steered separately
        self.topped_up = 0

    def layer_factory(self) -> LayerFactory:
        return kron_factory(self.cfg.block_shape, self.cfg.rank, self.cfg.path)

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.layers = [l for l in self.layers if isinstance(l, KRON_LAYERS)]
        self.masks = [torch.ones_like(l.S, dtype=torch.bool) for l in self.layers]
        self.lams = [self.lam] * len(self.layers)
        self._pin_scale()

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Weight decay on A, B (and on the weights of layers left dense), never on S or biases."""
        groups = {"decay": [], "rest": []}
        for name, p in model.named_parameters():
            decay = name.endswith((".A", ".B", "weight"))
            groups["decay" if decay else "rest"].append(p)
        return [{"params": groups["decay"], "weight_decay": self.weight_decay()},
                {"params": groups["rest"], "weight_decay": 0.0}]

    @property
    def num_blocks(self) -> int:
        return sum(m.numel() for m in self.masks)

    def sparsity(self) -> float:
        return sum(int((~m).sum()) for m in self.masks) / self.num_blocks

    @torch.no_grad()
    def after_step(self, model, optimizer, step: int, lr: float) -> None:
        if step >= self.sparsify_steps or (self.lam == 0 and self.steering is None):
            self._apply_masks()
            return
        self._pin_scale()
        self._prox(lr, step)
        if step == self.sparsify_steps - 1 and self.steering is not None:
            self._top_up(self.steering.schedule.final)

    @torch.no_grad()
    def _pin_scale(self) -> None:
        """With scale pin "norm": A[:, p, q] <- A[:, p, q] / n, S[p, q] <- S[p, q] * n, n = ||A[:, p, q]||."""
        if self.pin != "norm":
            return
        for layer in self.layers:
            # square-sum-sqrt, not linalg.vector_norm(dim=0): that took 12 ms for a (2, 150, 392) A
            # on CPU (torch 2.13), 90x this
            n = layer.A.square().sum(0).sqrt_().clamp_min_(torch.finfo(layer.A.dtype).tiny)
            layer.A.div_(n)
            layer.S.mul_(n)

    def _apply_masks(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            layer.S.masked_fill_(~mask, 0.0)

    def _prox(self, lr: float, step: int) -> None:
        """S <- soft_threshold(S * mask, lr * lambda_l); zero blocks join the mask. Few kernels: it
        runs every step.

        With a target, every layer is capped at the ramp's fraction of its own blocks (|S| is not
        comparable across layers, and a global cap could switch a whole small layer off)."""
        new = [soft_threshold(l.S.mul_(m), lr * lam) for l, m, lam in zip(self.layers, self.masks, self.lams)]
        if self.steering is not None:
            zeros = [n.numel() - int(torch.count_nonzero(n)) for n in new]
            for k, (layer, mask) in enumerate(zip(self.layers, self.masks)):
                self.lams[k] = self.steering.next_lambda(step, self.lams[k], zeros[k], mask.numel())
                excess = zeros[k] - self.steering.allowed(step, mask.numel())
                if excess > 0:  # the newly zeroed entries of largest |S| keep their value this step
                    S = layer.S.view(-1)  # already masked: pruned entries are 0 and never candidates
                    score = torch.where(new[k].view(-1) == 0, S.abs(), -1.0)
                    keep = torch.topk(score, excess, sorted=False).indices
                    new[k].view(-1)[keep] = S[keep]
        for k, (layer, n) in enumerate(zip(self.layers, new)):
            layer.S.copy_(n)
            self.masks[k] = n != 0

    def _top_up(self, target: float) -> None:
        """Prune each layer's active blocks of smallest dense-weight norm until it reaches `target`."""
        for k, (layer, mask) in enumerate(zip(self.layers, self.masks)):
            missing = count_for(target, mask.numel()) - int((~mask).sum())
            if missing > 0:
                norms = torch.where(mask, block_norms(*matrix_view(layer.dense_weight(), layer.block_shape)),
                                    math.inf)
                (drop,) = select([norms], missing, largest=False)
                self.masks[k] = mask & ~drop
                self.topped_up += missing
        self._apply_masks()

    def summary(self) -> dict:
        return {"final_lambda": list(self.lams), "topped_up_blocks": self.topped_up, "scale_pin": self.pin}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lams": list(self.lams)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lams = list(state["lams"])

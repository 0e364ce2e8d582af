"""The paper's method: W = sum_i kron(S * A_i, B_i), l1 on S with its proximal map (METHOD.md §3).

After every optimizer step S <- soft_threshold(S, lr * lambda), so blocks become exactly zero, and
pruned blocks stay pruned. Weight decay on A and B (not on S) pins the scale so the penalty cannot
be undone by growing A.

With a target sparsity P, lambda is steered: every `interval` steps the fraction of blocks the prox
wants zero is compared with a cubic ramp toward P (reached at 60% of the sparsifying phase) and
lambda is multiplied by exp(gain * error). The number of zero blocks never exceeds the ramp's
current value: when the prox would zero more, the blocks with the largest |S| keep their value for
that step. If P is not reached when the sparsifying phase ends, the active blocks with the
smallest norm are pruned to reach it. Then the mask is frozen for the rest of training.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..functional import block_norms, l1_penalty, soft_threshold
from ..layers import KRON_LAYERS, matrix_view
from ..models import LayerFactory, kron_factory
from .base import CubicSchedule, Method, log_step


class KronMethod(Method):
    name = "kron"
    default_weight_decay = 1e-3  # on A and B only; see METHOD.md §3 for why 1e-4 fails
    interval = 10  # steps between lambda updates
    gain = 4.0
    max_factor = 1.05  # per update
    initial_lambda = 1e-3

    def __init__(self, cfg, total_steps: int) -> None:
        super().__init__(cfg, total_steps)
        target = cfg.target_sparsity
        self.lam = cfg.lam if cfg.lam is not None else (self.initial_lambda if target else 0.0)
        self.schedule = CubicSchedule(target, int(0.6 * self.sparsify_steps)) if target is not None else None
        self.masks: list[Tensor] = []

    def layer_factory(self) -> LayerFactory:
        return kron_factory(self.cfg.block_shape, self.cfg.rank, self.cfg.path)

    def prepare(self, model: nn.Module) -> None:
        super().prepare(model)
        self.layers = [l for l in self.layers if isinstance(l, KRON_LAYERS)]
        self.masks = [torch.ones_like(l.S, dtype=torch.bool) for l in self.layers]

    def param_groups(self, model: nn.Module) -> list[dict]:
        groups = {"factors": [], "rest": []}
        for name, p in model.named_parameters():
            is_factor = name.endswith(".A") or name.endswith(".B") or name.endswith("weight")
            groups["factors" if is_factor else "rest"].append(p)
        return [{"params": groups["factors"], "weight_decay": self.weight_decay()},
                {"params": groups["rest"], "weight_decay": 0.0}]

    def penalty(self, model: nn.Module) -> Tensor | None:
        return None  # applied by the proximal map; see `l1_value` for logging

    def l1_value(self) -> float:
        return self.lam * sum(l1_penalty(l.S).item() for l in self.layers)

    @property
    def num_blocks(self) -> int:
        return sum(m.numel() for m in self.masks)

    def sparsity(self) -> float:
        return sum(int((~m).sum()) for m in self.masks) / self.num_blocks

    @torch.no_grad()
    def after_step(self, model, optimizer, step: int, lr: float) -> None:
        if step >= self.sparsify_steps:
            self._apply_masks()
            return
        if self.lam > 0:
            self._prox(lr * self.lam, step)
        else:
            self._apply_masks()
        if step == self.sparsify_steps - 1 and self.schedule is not None:
            self._top_up(self.schedule.final)

    def _apply_masks(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            layer.S.mul_(mask)

    def _prox(self, threshold: float, step: int) -> None:
        self._apply_masks()  # the optimizer's momentum may have moved pruned entries
        old = [l.S.detach().clone() for l in self.layers]
        for layer in self.layers:
            layer.S.copy_(soft_threshold(layer.S, threshold))
        wanted = sum(int((l.S == 0).sum()) for l in self.layers)
        if self.schedule is not None:
            allowed = math.ceil(self.schedule(step) * self.num_blocks - 1e-9)
            if wanted > allowed:
                self._restore_largest(old, wanted - allowed)
            if step % self.interval == 0:
                self.lam = log_step(self.lam, self.schedule(step) - wanted / self.num_blocks, self.gain,
                                    self.max_factor)
        for k, layer in enumerate(self.layers):
            self.masks[k] = self.masks[k] & (layer.S != 0)

    def _restore_largest(self, old: list[Tensor], count: int) -> None:
        """Undo the shrink of the `count` newly zeroed entries with the largest previous |S|."""
        newly = [(o != 0) & (l.S == 0) for o, l in zip(old, self.layers)]
        scores = torch.cat([torch.where(n, o.abs(), -1.0).flatten() for n, o in zip(newly, old)])
        keep = torch.zeros_like(scores, dtype=torch.bool)
        keep[torch.topk(scores, count).indices] = True
        offset = 0
        for o, layer in zip(old, self.layers):
            k = keep[offset: offset + o.numel()].view_as(o)
            layer.S.copy_(torch.where(k, o, layer.S))
            offset += o.numel()

    def _top_up(self, target: float) -> None:
        """Prune the active blocks of smallest dense-weight norm until `target` is reached."""
        missing = math.ceil(target * self.num_blocks - 1e-9) - int(sum((~m).sum() for m in self.masks))
        if missing <= 0:
            return
        norms = [torch.where(m, block_norms(*matrix_view(l.dense_weight(), l.block_shape)), float("inf"))
                 for l, m in zip(self.layers, self.masks)]
        flat = torch.cat([n.flatten() for n in norms])
        drop = torch.zeros_like(flat, dtype=torch.bool)
        drop[torch.topk(flat, missing, largest=False).indices] = True
        offset = 0
        for k, n in enumerate(norms):
            self.masks[k] = self.masks[k] & ~drop[offset: offset + n.numel()].view_as(n)
            offset += n.numel()
        self.topped_up = missing
        self._apply_masks()

    def summary(self) -> dict:
        return {"final_lambda": self.lam, "topped_up_blocks": getattr(self, "topped_up", 0)}

    def state_dict(self) -> dict:
        return {"lam": self.lam, "masks": [m.clone() for m in self.masks]}

    def load_state_dict(self, state: dict) -> None:
        self.lam = state["lam"]
        self.masks = [m.clone() for m in state["masks"]]

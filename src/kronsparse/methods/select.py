"""Pattern selection: train every candidate block shape at once and keep one.

Every weight layer is a KronSelectLinear, W = sum_k W_k, one Kronecker term per candidate k.
After every optimizer step the exact proximal map of the sparse group lasso

    lambda1 * sum_k sqrt(|g_k|) * ||g_k||_2 + lambda2 * sum_k ||S_k||_1

is applied to each group (soft-threshold by lr*lambda2, then group shrink by lr*lambda1*w_k with
w_k = sqrt(|g_k|) * ||g_k||_2 / ||S_k||_2). A candidate whose group is exactly zero is removed from
the model (parameters and compute gone; the loop rebuilds the optimizer through `structure_changed`).
When one candidate is left, every layer collapses to a plain KronLinear of its shape, which trains on
as in the kron method (this class is a KronMethod): l1 prox on S, lambda steered toward the target
sparsity, mask frozen after the sparsifying phase.

Decisions:
- The group g_k is S_k "as it acts on W": every entry repeated over the bo*bi weights it gates. So
  |g_k| = out*in for every candidate and w_k = sqrt(out*in) * sqrt(bo*bi). With METHOD's literal
  g_k = S_k (w_k = sqrt(#blocks), `group = "S"`) the penalty is structurally biased toward coarse
  blocks (an S entry's gradient grows with its block, the threshold with the block count): on planted
  teachers it chose 2x16 for a 2x8 teacher and 2x8 for a 2x2 teacher; the gated group recovers all
  three (tests/test_selection.py).
- One block shape per model (metrics measure one grid), so g_k is candidate k's S in every layer
  together; for the one-layer model that is one layer's S_k.
- The selection phase is the first 4/7 of the sparsifying phase (40% of training with the default
  sparsify fraction 0.7), leaving the survivor the rest of it to reach the target sparsity.
- lambda1 is chosen automatically (no knob): every `interval` steps it is multiplied by
  exp(gain * (plan - progress)) (the factor bounded so it can move 4 decades in half the phase);
  progress = mean over the candidates other than the leader of 1 - ||S_k|| / ||S_k at the start||
  (1 once removed), and the plan rises linearly to 1 at 3/4 of the selection phase.
- The leader is the candidate carrying the most weight, largest ||W_k||_F over all layers (the S
  norms are not comparable: the scale drifts between S and A). If several candidates survive the
  whole selection phase the leader is kept ("selection_forced" in metrics.json); the prox never
  removes the last candidate (if every group would reach zero in one step, the leader keeps its S).
- lambda2: with a target sparsity the l1 term starts at the collapse (steered from KronMethod's
  initial lambda, the ramp restarting there); without one, --lambda applies throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..blocks import block_name
from ..functional import group_norm_shrink, soft_threshold
from ..layers import DEFAULT_CANDIDATES, KronSelectLinear
from ..model_tree import as_linear, replace_module
from .base import learning_rates
from .kron import KronMethod, KronOptions
from .schedules import DelayedCubic
from .steering import log_step

SELECTION_RULE = ("the candidate left when the group lasso has zeroed all others; if several survive the "
                  "selection phase, the one carrying the most weight (largest ||W_k||_F)")
PLOT_NAME = "group_norms.png"


def sparse_group_prox(S: list[torch.Tensor], t_l1: float, t_group: float) -> list[torch.Tensor]:
    """Exact prox of t_l1*||g||_1 + t_group*||g||_2 for one group g spread over tensors S."""
    flat = group_norm_shrink(soft_threshold(torch.cat([s.flatten() for s in S]), t_l1), t_group)
    return [part.view_as(s) for part, s in zip(flat.split([s.numel() for s in S]), S)]


@dataclass
class SelectOptions(KronOptions):
    """KronOptions plus the candidate block shapes (block_shape is ignored: the run picks one) and
    the steps of an epoch (for the per-epoch norms in the summary; default: a tenth of training)."""

    candidates: tuple[tuple[int, int], ...] = DEFAULT_CANDIDATES
    steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.candidates = tuple(tuple(int(v) for v in c) for c in self.candidates)
        if not self.candidates:
            raise ValueError("method 'select' needs candidate block shapes, e.g. [(2, 2), (2, 8)]")


class SelectMethod(KronMethod):
    name = "select"
    Options = SelectOptions
    layer_kinds = (nn.Linear, KronSelectLinear)
    select_share = 4 / 7  # of the sparsifying phase
    plan_share = 0.75  # of the selection phase: where the plan reaches one survivor
    initial_group_lambda = 1e-2
    interval = 10  # steps between lambda1 updates
    group_gain = 4.0
    group = "gated"  # "gated": g_k = S_k repeated over the weights it gates; "S": g_k = S_k (biased, see doc)

    def __init__(self, options: SelectOptions, total_steps: int) -> None:
        super().__init__(options, total_steps)
        self.steering = None  # the survivor's ramp starts at the collapse
        self.select_steps = max(1, round(self.select_share * self.sparsify_steps))
        updates = max(1.0, self.select_steps / (2 * self.interval))
        self.group_max_factor = max(1.05, 10 ** (4 / updates))  # 4 decades in half the phase
        self.group_lam = self.initial_group_lambda
        self.shapes = {block_name(c): tuple(c) for c in options.candidates}
        self.removed_at: dict[str, int] = {}
        self.selected: str | None = None
        self.selected_at: int | None = None
        self.forced = False
        self.steps_per_epoch = options.steps_per_epoch or max(1, total_steps // 10)
        self.trace_every = max(1, self.steps_per_epoch // 20)
        self.epoch_norms: dict[str, list[float]] = {n: [] for n in self.shapes}  # ||S_k||_2
        self.epoch_weight_norms: dict[str, list[float]] = {n: [] for n in self.shapes}  # ||W_k||_F
        self.trace: dict[str, list] = {"step": [], **{n: [] for n in self.shapes}}
        self.model: nn.Module | None = None
        self.sizes: dict[str, int] = {}
        self.selection_params = 0
        self._changed = False

    # ---------------------------------------------------------------- structure

    def swap(self, module: nn.Module) -> nn.Module:
        if isinstance(module, KronSelectLinear):
            return module
        if self.options.init != "fresh":
            raise ValueError("method 'select' trains its candidates from scratch (init='fresh')")
        module = as_linear(module)  # a Conv1D as the nn.Linear it is
        W = module.weight
        layer = KronSelectLinear(module.in_features, module.out_features, self.options.candidates, self.options.rank,
                                 module.bias is not None, device=W.device, dtype=W.dtype, path=self.options.path)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
        if layers is None:
            layers = {n: m for n, m in model.named_modules() if isinstance(m, KronSelectLinear)}
        self.model = model
        # "auto" is "norm" on every model: every select result was made so (the one-layer rule of
        # kron.resolve_scale_pin counted the candidate terms as layers until 2026-12-01)
        self.pin = self.pin or "norm"
        self.names = [n for n, l in layers.items() if isinstance(l, KronSelectLinear)]
        self.layers = [layers[n] for n in self.names]
        if not self.layers:
            raise ValueError("method 'select' found no layer that every candidate block shape tiles")
        self.sizes = {n: sum(l.terms[n].S.numel() for l in self.layers) for n in self.shapes}
        self.start_norms = self.group_norms()
        self.selection_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.masks = []
        if len(self.shapes) == 1:
            self._collapse(next(iter(self.shapes)), 0)
        self._changed = False  # the optimizer is built after prepare

    def alive(self) -> list[str]:
        if self.selected is not None:
            return [self.selected]
        return [n for n in self.shapes if n not in self.removed_at]

    def _remove(self, name: str, step: int) -> None:
        for layer in self.layers:
            layer.remove(name)
        self.removed_at[name] = step
        self._changed = True

    def _collapse(self, name: str, step: int) -> None:
        """Every layer becomes the KronLinear of candidate `name`; the kron method takes over."""
        for other in self.alive():
            if other != name:
                self._remove(other, step)
        self.layers = [replace_module(self.model, n, l.collapse(name)) for n, l in zip(self.names, self.layers)]
        self.selected, self.selected_at = name, step
        ramp = int(0.6 * (self.sparsify_steps - step - 1))
        self._start_layers(DelayedCubic(self.options.target_sparsity or 0.0, step + 1, ramp))
        self._changed = True

    def structure_changed(self) -> bool:
        changed, self._changed = self._changed, False
        return changed

    @property
    def block_shape(self) -> tuple[int, int]:
        """The selected shape; while selecting, the current leader's."""
        if self.selected is not None:
            return self.shapes[self.selected]
        return self.shapes[self.leader()] if self.sizes else next(iter(self.shapes.values()))

    # ---------------------------------------------------------------- numbers

    @torch.no_grad()
    def group_norms(self) -> dict[str, float]:
        """||S_k||_2 of every candidate over all layers, 0 once removed."""
        norms = dict.fromkeys(self.shapes, 0.0)
        for n in self.alive():
            terms = self.layers if self.selected is not None else [l.terms[n] for l in self.layers]
            norms[n] = math.sqrt(sum(t.S.pow(2).sum().item() for t in terms))
        return norms

    def group_weight(self, name: str) -> float:
        """w_k in lambda1 * w_k * ||S_k||_2, i.e. sqrt(|g_k|) * ||g_k||_2 / ||S_k||_2 (see module doc)."""
        if self.group == "S":
            return math.sqrt(self.sizes[name])
        bo, bi = self.shapes[name]
        return math.sqrt(self.sizes[name] * bo * bi) * math.sqrt(bo * bi)  # sqrt(out*in) * sqrt(bo*bi)

    @torch.no_grad()
    def weight_norms(self) -> dict[str, float]:
        """||W_k||_F of every surviving candidate over all layers: the share of the weight it carries."""
        terms = {n: [l.terms[n] for l in self.layers] for n in self.alive()} if self.selected is None else \
            {self.selected: self.layers}
        return {n: math.sqrt(sum(t.dense_weight().pow(2).sum().item() for t in ts)) for n, ts in terms.items()}

    def leader(self) -> str:
        norms = self.weight_norms()
        return max(norms, key=norms.get)

    def progress(self) -> float:
        """0 at the start, 1 with one survivor: how far the candidates other than the leader have
        shrunk, mean over them of 1 - ||S_k|| / ||S_k at the start|| (1 once removed)."""
        if len(self.shapes) == 1:
            return 1.0
        now, lead = self.group_norms(), self.leader()
        return sum(1.0 - min(1.0, now[n] / self.start_norms[n]) for n in self.shapes if n != lead) / (
            len(self.shapes) - 1)

    # ---------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, optimizer, step: int, lr: float | None = None) -> None:
        if self.selected is None:
            first_S = next(iter(self.layers[0].terms.values())).S  # every candidate's S shares one lr
            self._select_step(step, learning_rates(optimizer, [first_S], lr)[0])
        else:
            super().step(optimizer, step, lr)
        self._record(step)

    @torch.no_grad()
    def finalize(self, optimizer=None) -> None:
        if self.selected is None:  # stopped while selecting: keep the leader
            self.forced = True
            self._collapse(self.leader(), self.sparsify_steps - 1)
        super().finalize(optimizer)

    def _select_step(self, step: int, lr: float) -> None:
        lam2 = 0.0 if self.options.target_sparsity is not None else self.lam
        zeroed = []
        for n in self.alive():
            S = [l.terms[n].S for l in self.layers]
            new = sparse_group_prox(S, lr * lam2, lr * self.group_lam * self.group_weight(n))
            if any(t.any() for t in new):
                for s, t in zip(S, new):
                    s.copy_(t)
            else:
                zeroed.append(n)  # removed below, so never written
        if len(zeroed) == len(self.alive()):  # never the last one: the leader keeps its S of before
            zeroed.remove(self.leader())
        for n in zeroed:
            self._remove(n, step)
        if step % self.interval == 0:
            plan = min(1.0, (step + 1) / (self.plan_share * self.select_steps))
            self.group_lam = log_step(self.group_lam, plan - self.progress(), self.group_gain,
                                      self.group_max_factor, hi=1e4)
        if len(self.alive()) == 1 or step >= self.select_steps - 1:
            self.forced = len(self.alive()) > 1
            self._collapse(self.leader(), step)
            if step >= self.sparsify_steps - 1:
                self.finalize()

    def _record(self, step: int) -> None:
        end_of_epoch = (step + 1) % self.steps_per_epoch == 0
        if step % self.trace_every and not end_of_epoch:
            return
        S, W = self.group_norms(), self.weight_norms()
        self.trace["step"].append(step + 1)
        for n in self.shapes:
            self.trace[n].append((S[n], W.get(n, 0.0)))
            if end_of_epoch:
                self.epoch_norms[n].append(S[n])
                self.epoch_weight_norms[n].append(W.get(n, 0.0))

    # ---------------------------------------------------------------- reports

    def summary(self) -> dict:
        selected = list(self.shapes[self.selected]) if self.selected is not None else None
        return {**super().summary(), "selected_block_shape": selected, "selected_at_step": self.selected_at,
                "selection_forced": self.forced, "selection_rule": SELECTION_RULE,
                "removed_at_step": dict(self.removed_at), "group_lambda": self.group_lam,
                "selection_train_params": self.selection_params, "group_norms_plot": PLOT_NAME,
                "group_norms": {n: list(v) for n, v in self.epoch_norms.items()},
                "weight_norms": {n: list(v) for n, v in self.epoch_weight_norms.items()}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "group_lam": self.group_lam, "removed_at": dict(self.removed_at),
                "selected": self.selected, "selected_at": self.selected_at, "forced": self.forced,
                "epoch_norms": {n: list(v) for n, v in self.epoch_norms.items()},
                "epoch_weight_norms": {n: list(v) for n, v in self.epoch_weight_norms.items()},
                "trace": {k: list(v) for k, v in self.trace.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore, restructuring the prepared model first (so its state_dict then loads)."""
        for n in state["removed_at"]:
            if n != state["selected"] and n in self.alive():
                self._remove(n, state["removed_at"][n])
        if state["selected"] is not None and self.selected is None:
            self._collapse(state["selected"], state["selected_at"])
        super().load_state_dict(state)
        self.group_lam, self.forced = state["group_lam"], state["forced"]
        self.removed_at = dict(state["removed_at"])
        self.epoch_norms = {n: list(v) for n, v in state["epoch_norms"].items()}
        self.epoch_weight_norms = {n: list(v) for n, v in state["epoch_weight_norms"].items()}
        self.trace = {k: list(v) for k, v in state["trace"].items()}

"""The paper's method: W = sum_i kron(S * A_i, B_i), l1 on S with its proximal map.

After every optimizer step S <- soft_threshold(S, lr * lambda) (lr: the optimizer's, read from its
param group), so blocks become exactly zero, and pruned blocks stay pruned (their gradient is masked
too, so no optimizer state builds up on them). Weight decay on A and B (not on S) pins the scale
so the penalty cannot be undone by growing A.

With a target sparsity P, lambda is steered per layer (by default; methods/steering.py) so the
zero blocks follow a cubic ramp toward P (reached at 60% of the sparsifying phase). The default
steering ("track") sets the threshold every step from the order statistics of the layer's |S|:
the k-th smallest, k the ramp's count 10 steps ahead, over 10 steps, times a multiplier that grows
while the zeros lag the ramp. So lambda's scale comes from the model and the optimizer (lambda =
threshold / lr) and the penalty does the pruning in runs of 200 steps as of 20,000, under SGD and
Adam. `steering="legacy"` is the steering before (lambda from 1e-3, at most 1.05x per 10 steps: in
short runs the final top-up made nearly all the zeros); `steering="prune"` drops the penalty and
prunes the smallest |S| up to the ramp (gradual magnitude pruning of S). The number of zero blocks
never exceeds the ramp's current value: when the prox would zero more, the blocks with the largest
|S| keep their value for that step. If a layer has not reached P when the sparsifying phase ends,
its active blocks with the smallest norm are pruned to reach it (the top-up, a last resort). Then
the mask is frozen for the rest of training.

Two ways keep the scale from escaping into A (`scale_pin`; "auto", the default, picks "decay" when
the model has a single weight layer and "norm" otherwise):

- "decay": weight decay on A and B. S starts at 1 everywhere, so the prox shrinks every
  block alike and no block reaches zero until lambda is large; then many fall at once, with S near 0
  (a "cliff" in lambda). On the one-layer model this works (its argmax does not care that all
  logits shrink together; it is what the README's table uses, 0.25 and 0.55 points above "norm");
  a deep ReLU model loses 9.3 points (MLP, 10 epochs, 2x2: 88.87% vs 98.13% with "norm").
- "norm": while sparsifying, every block's A[:, p, q] is rescaled to unit norm after each step and
  S[p, q] takes the norm (S*A, hence W, unchanged). |S[p, q]| is then the size of block (p, q), the
  prox removes the smallest blocks first and sparsity follows the ramp instead of falling off a
  cliff. The ramp starts at 25% of the sparsifying phase, once the sizes mean something (measured:
  starting at 0 cost 0.3-0.5 points on the linear model).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..blocks import matrix_view
from ..functional import block_norms, soft_threshold
from ..layers import INITS, KRON_LAYERS, KronConv2d, KronLinear, kron_like
from ..model_tree import as_linear, depth
from ..sharding import zero_where_
from .base import ADAPTIVE_OPTIMIZERS, Method, MethodOptions, learning_rates, mask_grad, with_lr
from .schedules import DelayedCubic
from .steering import TargetSteering

SCALE_PINS = ("auto", "decay", "norm")
# The factors' lr multiple under Adam-type optimizers (KronOptions.factor_lr), from the ViT of
# results/vit-variants (Fashion-MNIST, AdamW 1e-3, 4x4 blocks, rank 4, 50%, 3 epochs, seed 0):
# x1 79.73%, x2 80.97%, x4 82.58%, x8 83.46%, x16 82.34% (block magnitude pruning 82.86%, dense 83.78%);
# over 3 seeds x8 83.07 +- 0.34% against block magnitude's 82.89 +- 0.04%
ADAPTIVE_FACTOR_LR = 8.0


@dataclass
class KronOptions(MethodOptions):
    """The kron method's options on top of MethodOptions.

    rank: Kronecker terms per layer. scale_pin: see the module doc. path: KronLinear's contraction
    ("auto" = cost model). init: how a swapped nn.Linear/Conv2d starts: "fresh" = the layer's own
    init with the dense layer's weight variance (training from scratch), "svd" = the nearest
    Kronecker sum of its current weight (converting a trained model). factor_lr: the learning rate
    of A, B and S as a multiple of the optimizer's; None: 8 under Adam-type optimizers, 1 under
    the others, and 1 on a model with one weight layer or with the "decay" scale pin. An Adam step
    moves every entry by about lr whatever its scale, and a product of factors then moves W far
    less than a dense weight (W ~ 0.07, the factors 0.2-0.5: a ViT at 4x4, rank 4, trained 2.2
    points below dense without any sparsity at x1 and level with it at x8). Under SGD x8 also helps
    deep models at a small lr (MNIST MLP at 0.01: 96.15% -> 97.55%) but diverged at 0.05, so it is
    an explicit choice there. On the one-layer model x8 gains nothing under SGD and under Adam lets
    A decay to dead blocks that overshoot the target (results/vit-variants)."""

    rank: int = 2
    scale_pin: str = "auto"
    path: str = "auto"
    init: str = "fresh"
    factor_lr: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.scale_pin not in SCALE_PINS:
            raise ValueError(f"unknown scale pin {self.scale_pin!r}; valid: {', '.join(SCALE_PINS)}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; valid: {', '.join(INITS)}")
        if self.factor_lr is not None and not (self.factor_lr > 0 and math.isfinite(self.factor_lr)):
            raise ValueError(f"factor_lr must be a finite number > 0, got {self.factor_lr}")


def resolve_scale_pin(pin: str, model: nn.Module | int) -> str:
    """"auto" is "decay" for a model with one weight layer (logistic regression) and "norm" for any
    deeper one, where "decay" loses 9.3 points (MLP, 10 epochs, 2x2: 88.87% vs 98.13%). The layers
    are the model's (model_tree.depth: every layer holding a weight matrix, GPT-2's Conv1D and
    embeddings included), not the sparsified ones. `model`: the model, or its number of weight
    layers (an application that knows it without building the model)."""
    if pin != "auto":
        return pin
    count = model if isinstance(model, int) else depth(model)
    return "decay" if count == 1 else "norm"


class KronMethod(Method):
    name = "kron"
    Options = KronOptions
    default_weight_decay = 1e-3  # on A and B only; 1e-4 lets the scale escape into A
    initial_lambda = 1e-3  # where steering starts when only a target is given
    trains_factors = True
    layer_kinds = (nn.Linear, nn.Conv2d, KronLinear, KronConv2d)

    def __init__(self, options: KronOptions, total_steps: int) -> None:
        super().__init__(options, total_steps)
        # a target steers lambda from the given value (or a small start); without one lambda is fixed
        target = options.target_sparsity
        self.lam = (options.lam or self.initial_lambda) if target is not None else (options.lam or 0.0)
        self.pin = options.scale_pin if options.scale_pin != "auto" else None  # resolved in prepare
        self.steering: TargetSteering | None = None
        self.masks: list[Tensor] = []
        self.lams: list[float] = []  # one lambda per layer (the steering's, with a target)
        self.topped_up = 0
        self.topped_up_layers: list[int] = []  # per layer, for topup_share()
        self.used_factor_lr = 1.0  # what param_groups applied

    def schedule(self) -> DelayedCubic:
        """The ramp toward the target. It waits a quarter of the sparsifying phase, so |S| means
        something when the first blocks are chosen (with the "norm" pin it is then the block's size;
        with "decay" S starts at 1 everywhere, and the "track" steering choosing from step 0 pruned a
        block a planted teacher kept), except under the "legacy" steering with the "decay" pin, whose
        lambda needed that time to grow anyway."""
        start = int(0.25 * self.sparsify_steps) if self.pin == "norm" or self.options.steering != "legacy" else 0
        return DelayedCubic(self.options.target_sparsity, start, int(0.6 * self.sparsify_steps) - start)

    def swap(self, module: nn.Module) -> nn.Module:
        if isinstance(module, KRON_LAYERS):
            return module
        o = self.options
        return kron_like(as_linear(module), o.block_shape, o.rank, o.init, o.path)

    def prepare(self, model: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
        super().prepare(model, layers)
        if self.pin is None:
            self.pin = resolve_scale_pin(self.options.scale_pin, model)
        kept = [(n, l) for n, l in zip(self.names, self.layers) if isinstance(l, KRON_LAYERS)]
        self.names, self.layers = [n for n, _ in kept], [l for _, l in kept]
        self._start_layers()

    def _start_layers(self, schedule=None) -> None:
        self.masks = [l.S.detach() != 0 for l in self.layers]
        if self.options.target_sparsity is not None:
            self.steering = TargetSteering(schedule or self.schedule(), [m.numel() for m in self.masks], self.lam,
                                           self.options.scope, mode=self.options.steering)
            self.lams = self.steering.lams
        else:
            self.lams = [self.lam] * len(self.layers)
        self._mask_grads()
        self._pin_scale()

    def _mask_grads(self, zeros: list[int] | None = None) -> None:
        """S's gradient is zero on pruned blocks, so no optimizer (momentum, Adam) moves them. A layer
        with no pruned block gets no hook (times 1 changes no bit), the others their mask in S's
        dtype, which the prox reuses (a bool mask is converted at every multiply). `zeros`: the
        pruned blocks per layer, where the caller has counted them."""
        if zeros is None:
            zeros = [m.numel() - int(m.count_nonzero()) for m in self.masks]
        self._live = [m.to(layer.S.dtype) if z else None for layer, m, z in zip(self.layers, self.masks, zeros)]
        for layer, mask in zip(self.layers, self._live):
            mask_grad(layer.S, mask)

    def factor_lr(self, model: nn.Module, optimizer_cls: type | None) -> float:
        """The factors' learning rate as a multiple of the optimizer's (KronOptions.factor_lr): 1 on
        a model with one weight layer or with the "decay" scale pin, else 8 under Adam-type optimizers."""
        if self.options.factor_lr is not None:
            return self.options.factor_lr
        if self.pin == "decay" or depth(model) == 1:
            return 1.0
        adaptive = optimizer_cls is not None and issubclass(optimizer_cls, ADAPTIVE_OPTIMIZERS)
        return ADAPTIVE_FACTOR_LR if adaptive else 1.0

    def param_groups(self, model: nn.Module, weight_decay: float | None = None, lr: float | None = None,
                     optimizer_cls: type | None = None) -> list[dict]:
        """Weight decay on A, B (and the weights of layers left dense); never on S, biases or norms.
        With `lr`, A, B and S train at factor_lr x lr and everything else at lr; without it every
        group takes the optimizer's lr (a warning says so where the factors would want more; an
        unnamed optimizer counts as Adam-type)."""
        if lr is None and self.factor_lr(model, optimizer_cls or torch.optim.AdamW) != 1.0:
            warnings.warn("kronsparse: the Kronecker factors (A, B, S) train at the optimizer's lr; under Adam-type "
                          f"optimizers they train better at {ADAPTIVE_FACTOR_LR:g}x it: build the optimizer with "
                          "Sparsifier.optimizer(torch.optim.AdamW, lr=...) or pass lr= and optimizer_cls= to "
                          "param_groups (factor_lr=1 keeps the optimizer's lr and silences this)", stacklevel=3)
        scale = self.factor_lr(model, optimizer_cls)
        self.used_factor_lr = scale if lr is not None else 1.0
        groups: dict[tuple[bool, bool], list] = {}
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            factor = name.endswith((".A", ".B", ".S"))
            decay = name.endswith((".A", ".B")) or (p.dim() > 1 and not factor)
            groups.setdefault((decay, factor), []).append(p)
        wd = self.weight_decay(weight_decay)
        order = sorted(groups, key=lambda key: (not key[0], key[1]))  # decayed groups first
        return with_lr([{"params": groups[key], "weight_decay": wd if key[0] else 0.0,
                         **({"lr_scale": scale} if key[1] else {})} for key in order], lr)

    @torch.no_grad()
    def step(self, optimizer, step: int, lr: float | None = None) -> None:
        if self.finalized or step >= self.sparsify_steps or (self.lam == 0 and self.steering is None):
            self._apply_masks()
            return
        self._pin_scale()
        self._prox(learning_rates(optimizer, [l.S for l in self.layers], lr), step)
        if step == self.sparsify_steps - 1:
            self.finalize(optimizer)

    @torch.no_grad()
    def finalize(self, optimizer=None) -> None:
        """Top up to the target where a layer has not reached it; freeze the masks."""
        if not self.finalized and self.steering is not None:
            self._top_up()
        self._apply_masks()
        self.finalized = True

    @torch.no_grad()
    def _pin_scale(self) -> None:
        """With scale pin "norm": A[:, p, q] <- A[:, p, q] / n, S[p, q] <- S[p, q] * n, n = ||A[:, p, q]||."""
        if self.pin != "norm":
            return
        # square-sum-sqrt, not linalg.vector_norm(dim=0): that took 12 ms for a (2, 150, 392) A on CPU
        # (torch 2.13), 90x this. One foreach call per operation over all layers: the same kernels
        # (so the same bits) as a loop over layers, without its Python and dispatch per layer
        As, Ss = [layer.A for layer in self.layers], [layer.S for layer in self.layers]
        norms = [a2.sum(0) for a2 in torch._foreach_pow(As, 2)]
        torch._foreach_sqrt_(norms)
        torch._foreach_clamp_min_(norms, [torch.finfo(a.dtype).tiny for a in As])
        torch._foreach_div_(As, norms)
        torch._foreach_mul_(Ss, norms)

    @torch.no_grad()
    def _apply_masks(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            zero_where_(layer.S, ~mask)

    def _prox(self, steps: list, step: int) -> None:
        """S <- soft_threshold(S * mask, step * lambda_l); zero blocks join the mask. Few kernels: it
        runs every step. With a target, the zeros are capped at the ramp (methods/steering.py)."""
        Ss = [layer.S for layer in self.layers]
        if self.steering is not None:  # the scores are built only when an order statistic is taken
            self.steering.track(step, lambda: [S.abs() if m is None else S.abs() * m for S, m in zip(Ss, self._live)],
                                steps)
        pruned = [(S, m) for S, m in zip(Ss, self._live) if m is not None]  # times 1 elsewhere: no change
        if pruned:
            torch._foreach_mul_([S for S, _ in pruned], [m for _, m in pruned])
        new = [soft_threshold(S, s * lam) for S, s, lam in zip(Ss, steps, self.lams)]
        masks, zeros = [n != 0 for n in new], None
        if self.steering is not None:
            zeros = [m.numel() - int(m.count_nonzero()) for m in masks]
            self.steering.update(step, zeros)
            keep = self.steering.keep_excess(step, lambda: [~m for m in masks], lambda: [S.abs() for S in Ss], zeros)
            if keep is not None:  # the newly zeroed entries of largest |S| keep their value this step
                new = [torch.where(k, S, n) for k, S, n in zip(keep, Ss, new)]
                masks, zeros = [n != 0 for n in new], None
            if self.steering.mode == "prune":  # the smallest |S| up to the ramp
                drop = self.steering.floor(step, masks, [n.abs() for n in new])
                if drop is not None:
                    new = [n.masked_fill(d, 0.0) for n, d in zip(new, drop)]
                    masks, zeros = [n != 0 for n in new], None
        torch._foreach_copy_(Ss, new)
        self.masks = masks
        self._mask_grads(zeros)

    @torch.no_grad()
    def _top_up(self) -> None:
        """Prune the active blocks of smallest dense-weight norm until the target is reached."""
        norms = [block_norms(*matrix_view(l.dense_weight(), l.block_shape)) for l in self.layers]
        drop = self.steering.top_up(self.masks, norms)
        self.topped_up_layers = [int(d.sum()) for d in drop]
        for k, d in enumerate(drop):
            self.masks[k] = self.masks[k] & ~d
        self.topped_up += sum(self.topped_up_layers)
        self._mask_grads()

    def summary(self) -> dict:
        return {"final_lambda": list(self.lams), "topped_up_blocks": self.topped_up, "scale_pin": self.pin,
                "factor_lr": self.used_factor_lr, "steering": self.options.steering}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lam": self.lam, "lams": list(self.lams),
                "masks": [m.clone() for m in self.masks], "topped_up": self.topped_up,
                "topped_up_layers": list(self.topped_up_layers),
                "steering": self.steering.state_dict() if self.steering else None}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lam = state["lam"]
        self.lams[:] = list(state["lams"])  # in place: the steering holds the same list
        self.masks = [m.clone() for m in state["masks"]]
        self.topped_up = state["topped_up"]
        self.topped_up_layers = list(state.get("topped_up_layers", []))
        if self.steering is not None and state.get("steering"):
            self.steering.load_state_dict(state["steering"])
        self._mask_grads()

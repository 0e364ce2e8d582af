"""Sparsifier: every method of kronsparse on any PyTorch model, in the user's own training loop.

    sp = Sparsifier(model, method="kron", block_shape=(4, 4), rank=4, target_sparsity=0.5, total_steps=N)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)
    for step in range(N):
        ...; loss.backward(); opt.step(); sp.step(opt)
    sp.finalize()

    print(sp.summary())   # what was sparsified, what stayed dense and why, the share of weights covered
    sp.squash()           # a plain model again: nn.Linear / Conv1D / nn.Conv2d with the exact zero blocks

Shaped like torch.ao.pruning's sparsifiers (prepare on a model, step, squash, state_dict). The layers
come from `named_modules()`: by default every nn.Linear, nn.Conv2d and transformers Conv1D that the
block shape tiles, except a layer whose weight is tied to another (an output layer tied to the input
embedding stays dense unless named in `layers=`). Methods that train Kronecker factors (kron, select)
swap those layers in place when the Sparsifier is built, so build it before the optimizer.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from torch import nn

from .blocks import matrix_view
from .coverage import COVERAGE_WARNING, SparsitySummary, summarize
from .functional import block_mask_of
from .layers import KRON_LAYERS
from .methods import get_method
from .methods.base import set_grad_hook
from .model_tree import LayerFilter, find_layers, layer_weight, replace_module, tied_weights
from .sharding import any_sharded, gathered, is_sharded
from .squash import guard_save_pretrained, squash_


class Sparsifier:
    """Drive one sparsity method on `model`.

    Args:
        model: any nn.Module; changed in place for methods that train Kronecker factors.
        method: a registered name: kron, select, group-lasso, elastic-group-lasso, rigl,
            iterative-pruning, block-magnitude, dense.
        block_shape: (bo, bi) in nn.Linear's (out, in) order (a conv: over its channels).
        total_steps: optimizer steps of the whole run (schedules are fractions of it).
        target_sparsity: fraction of zero blocks to reach in every sparsified layer (scope="global":
            over all of them together); for iterative-pruning, a fraction of weights.
        layers: None (every nn.Linear, nn.Conv2d and Conv1D the block tiles, tied ones left dense;
            the Sparsifier warns when those hold under half of the model's weights), a list of
            module names, or a callable (name, module) -> bool. `print(sp.summary())` shows what
            was sparsified and what stayed dense, and why.
        **options: the method's own options (`get_method(name).Options`), e.g. rank, scale_pin,
            init ("fresh" or "svd"), lam, sparsify_fraction, weight_decay, scope, candidates, steering
            ("track", the default: the penalty follows the ramp; "legacy"; "prune": no penalty).
    """

    def __init__(self, model: nn.Module, method: str = "kron", *, block_shape=(4, 4), total_steps: int,
                 target_sparsity: float | None = None, layers: list[str] | LayerFilter | None = None,
                 **options) -> None:
        cls = get_method(method)
        self.options = cls.Options.from_kwargs(method, {"block_shape": block_shape,
                                                        "target_sparsity": target_sparsity, **options})
        self.method = cls(self.options, total_steps)
        self.model = model
        found = find_layers(model, self.options.block_shape, layers, getattr(self.options, "candidates", None),
                            kinds=cls.layer_kinds)
        if any_sharded(found.values()):
            raise ValueError("the model is already sharded (fully_shard): build the Sparsifier first, then call "
                             "fully_shard, then build the optimizer (docs/your-model.md, FSDP2)")
        if cls.trains_factors:
            refuse_tied(model, found)
        self.originals = {name: type(m) for name, m in found.items()}  # what squash() puts back
        self.layers = {name: self._swapped(name, m) for name, m in found.items()}
        self.method.prepare(model, self.layers)
        self.steps = 0
        self.squashed = False
        if cls.trains_factors:
            guard_save_pretrained(model)
        self._record_marks()
        self._warn_capped_rank()
        if layers is None:  # the layers chosen for the user: say when they leave most weights dense
            self._warn_coverage()

    def _swapped(self, name: str, module: nn.Module) -> nn.Module:
        new = self.method.swap(module)
        if new is module:
            return module
        if not name:
            raise ValueError("the model is itself the layer to swap: wrap it, e.g. nn.Sequential(layer)")
        return replace_module(self.model, name, new)

    def _warn_capped_rank(self) -> None:
        rank = getattr(self.options, "rank", None)
        capped = {n: l.rank for n, l in self.layers.items() if isinstance(l, KRON_LAYERS) and l.rank < rank}
        if capped:
            listed = ", ".join(f"{n} ({r})" for n, r in list(capped.items())[:4])
            warnings.warn(f"kronsparse: rank {rank} is above the full Kronecker rank of {len(capped)} layer(s), "
                          f"capped there: {listed}{', ...' if len(capped) > 4 else ''} (no higher rank adds anything)",
                          UserWarning, stacklevel=3)

    def _warn_coverage(self) -> None:
        summary = self.summary()
        if summary.coverage < COVERAGE_WARNING:
            dense = sorted(summary.dense(), key=lambda r: -r.weights)[:3]
            listed = "; ".join(f"{r.name} ({r.weights:,}: {r.reason})" for r in dense)
            warnings.warn(f"kronsparse: the sparsified layers hold {summary.coverage:.0%} of the model's weights "
                          f"({summary.covered_weights:,} of {summary.total_weights:,}); the largest dense ones: {listed}. "
                          "print(sp.summary()) lists every layer", UserWarning, stacklevel=3)

    @property
    def total_steps(self) -> int:
        return self.method.total_steps

    def param_groups(self, weight_decay: float | None = None, lr: float | None = None,
                     optimizer_cls: type | None = None) -> list[dict]:
        """Parameter groups for the optimizer: weight decay (the method's default if None) on
        weights and Kronecker factors A, B; never on S, biases or norms. With `lr` (and the
        optimizer's class) every group carries its lr: Kronecker factors train at `factor_lr` x lr
        (8x under Adam-type optimizers, see KronOptions). `optimizer()` does all of this."""
        self._carry_marks()
        return self.method.param_groups(self.model, weight_decay, lr, optimizer_cls)

    def optimizer(self, optimizer_cls: type, lr: float, weight_decay: float | None = None,
                  **kwargs) -> torch.optim.Optimizer:
        """`optimizer_cls` over this model's parameter groups, e.g.
        `sp.optimizer(torch.optim.AdamW, lr=1e-3, weight_decay=0.05)`; kwargs go to the optimizer."""
        return optimizer_cls(self.param_groups(weight_decay, lr, optimizer_cls), lr=lr, **kwargs)

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Call after every optimizer.step(): proximal maps, masks, mask updates. When the method
        removed parameters (select), they leave the optimizer's groups and state here."""
        self._refuse_squashed("step")
        with self._gathered(needed=not self.method.finalized):  # frozen masks apply to each rank's chunk
            self.method.step(optimizer, self.steps)
        if self.method.structure_changed():
            drop_missing_params(optimizer, self.model)
        self.steps += 1

    @torch.no_grad()
    def finalize(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Exact zero blocks everywhere, at the target (topped up if the run ended early); masks
        frozen: later `step` calls keep the zero blocks zero."""
        self._refuse_squashed("finalize")
        with self._gathered():
            self.method.finalize(optimizer)
        if optimizer is not None and self.method.structure_changed():
            drop_missing_params(optimizer, self.model)
        share = self.topup_share()
        if share is not None and share["total"] > 0.5:
            warnings.warn(f"kronsparse: the final top-up made {100 * share['total']:.0f}% of the zero blocks (the "
                          "penalty did not reach the target by itself: the run's sparsity is then mostly one "
                          "magnitude pruning step); see Sparsifier.topup_share()", stacklevel=2)

    def topup_share(self) -> dict | None:
        """The share of zero blocks that the final top-up made rather than the penalty:
        {"total": share over all sparsified layers, "layers": {name: share}} (0 where a layer has
        no zero block); None for methods without a top-up or before it ran."""
        layers = getattr(self.method, "topped_up_layers", None)
        if not layers:
            return None
        counts = self._counts("block")
        zeros = [counts[name][0] for name in self.method.names]
        per = {name: (t / z if z else 0.0) for name, t, z in zip(self.method.names, layers, zeros)}
        return {"total": sum(layers) / sum(zeros) if sum(zeros) else 0.0, "layers": per}

    @property
    def block_shape(self) -> tuple[int, int]:
        return self.method.block_shape

    def sparsified_layers(self) -> dict[str, nn.Module]:
        """The sparsified layers by name, as they are in the model now."""
        return {name: self.model.get_submodule(name) for name in self.layers}

    @torch.no_grad()
    def _counts(self, kind: str) -> dict[str, tuple[int, int]]:
        counts = {}
        with self._gathered(write_back=False):
            for name, layer in self.sparsified_layers().items():
                W = layer_weight(layer)
                if kind == "weight":
                    counts[name] = (int((W == 0).sum()), W.numel())
                else:
                    mask = block_mask_of(*matrix_view(W, self.block_shape))
                    counts[name] = (int((~mask).sum()), mask.numel())
        return counts

    def layer_sparsity(self, kind: str = "block") -> dict[str, float]:
        """{layer name: fraction of zero blocks (kind="weight": zero weights)}, from the dense weights."""
        return {n: z / t for n, (z, t) in self._counts(kind).items()}

    def block_sparsity(self, kind: str = "block") -> float:
        """Zero blocks / blocks over the sparsified layers (kind="weight": zero weights / weights).
        Those layers may hold a small share of the model: see coverage() and summary()."""
        counts = self._counts(kind).values()
        return sum(z for z, _ in counts) / sum(t for _, t in counts)

    def coverage(self) -> float:
        """The share of the model's weights (parameters of two or more dims, ties once) that lies in
        the sparsified layers."""
        return self.summary().coverage

    def summary(self) -> SparsitySummary:
        """Every layer of the model that holds weights: sparsified (its block grid and zero blocks
        now) or dense (and why), the weights covered; `print(sp.summary())` shows it as a table and
        `sp.summary()["key"]` reads the method's own numbers (e.g. "final_lambda")."""
        with self._gathered(write_back=False):
            return summarize(self.model, self.sparsified_layers(), self.block_shape, self.method.name,
                             self.method.layer_kinds, getattr(self.options, "candidates", None),
                             self.method.summary(), self._counts("block"), self.originals, self.method.layer_stats())

    def export(self, path, fmt: str = "dense"):
        """The model as one safetensors file (kronsparse.export): "dense", "bsr" (the sparsified layers
        in their blocks, the rest dense) or "factors" (Kronecker layers as S, A, B). Read it back with
        kronsparse.inference (replace_layers_, load_layers) or, "dense", with model.load_state_dict."""
        from .export import export_model

        self._refuse_sharded("export")
        return export_model(self.model, path, fmt, "custom", {n: self.block_shape for n in self.layers})

    @torch.no_grad()
    def squash(self) -> nn.Module:
        """A plain model, in place: finalize (if not done), then every Kronecker layer becomes the
        module it replaced (nn.Linear, nn.Conv2d, Conv1D) with its exact dense weight, and the
        gradient masks on the weights are released. Outputs are unchanged; the model saves and loads
        as its own architecture. The Sparsifier is done afterwards. Returns the model."""
        if self.squashed:
            return self.model
        self._refuse_sharded("squash")
        if not self.method.finalized:
            self.finalize()
        self.method.squash()  # block-magnitude finalized on a sharded model still holds its parametrization
        squash_(self.model, self.originals)
        for p in self.model.parameters():
            if getattr(p, "_kronsparse_hooked", False):
                set_grad_hook(p, None)
        self.squashed = True
        return self.model

    def _refuse_squashed(self, what: str) -> None:
        if self.squashed:
            raise ValueError(f"the Sparsifier has squashed its model into plain layers: it cannot {what} any more")

    # -- FSDP2 (sharding.py): the method's work runs on full copies of the sharded parameters -----

    def _gathered(self, write_back: bool = True, needed: bool = True):
        """The sparsified layers' sharded parameters as full copies while the method works on them
        (not `needed`: they stay sharded)."""
        if any_sharded(self.layers.values()):
            if self.method.name in UNSHARDABLE:
                raise ValueError(f"method {self.method.name!r} does not run on a sharded (fully_shard) model: it "
                                 f"{UNSHARDABLE[self.method.name]}")
            self._carry_marks()
        return gathered(self.layers.values(), write_back) if needed else nullcontext()

    def _refuse_sharded(self, what: str) -> None:
        if any_sharded(self.layers.values()):
            raise ValueError(f"cannot {what} a sharded (fully_shard) model: load its full state dict into an "
                             "unsharded model with its own Sparsifier first (docs/your-model.md, FSDP2)")

    def _record_marks(self) -> None:
        """What the method has put on its layers' parameters so far (a gradient hook, a Conv1D
        weight's orientation): fully_shard replaces every parameter by a new sharded one, and
        `_carry_marks` puts them on those."""
        self._marks = {(name, pn): marks for name, layer in self.layers.items() for pn, p in layer.named_parameters()
                       if (marks := {k: v for k, v in vars(p).items() if k.startswith(MARK)})}

    def _carry_marks(self) -> None:
        for (name, pn), marks in self._marks.items():
            p = self.layers[name].get_parameter(pn)
            if not is_sharded(p):
                continue
            for key, value in marks.items():
                if key not in HOOK_MARKS and not hasattr(p, key):
                    setattr(p, key, value)
            if marks.get("_kronsparse_hooked") and not getattr(p, "_kronsparse_hooked", False):
                set_grad_hook(p, marks["_kronsparse_grad_fn"])

    def state_dict(self) -> dict:
        """Everything of the Sparsifier's to resume mid-run (the model and optimizer have their own)."""
        return {"steps": self.steps, "method_name": self.method.name, "layers": list(self.layers),
                "method": self.method.state_dict()}

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore; a method that restructures the model (select) does so first, so the model's
        state_dict loads after this. Pass the optimizer to drop parameters that no longer exist
        (before loading its state_dict). A state of another method, another model's layers or no
        Sparsifier at all is refused (ValueError)."""
        self._check_state(state)
        with self._gathered():
            self.method.load_state_dict(state["method"])
        self._record_marks()
        self.steps = state["steps"]
        if self.method.structure_changed() and optimizer is not None:
            drop_missing_params(optimizer, self.model)

    def _check_state(self, state) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("steps"), int) or not isinstance(
                state.get("method"), dict):
            keys = ", ".join(map(str, list(state)[:5])) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"not a Sparsifier state_dict (it needs 'steps' and 'method'; got {keys})")
        name = state.get("method_name", self.method.name)  # states saved before 2026-12-07 have no name
        if name != self.method.name:
            raise ValueError(f"a state of method {name!r} cannot resume a Sparsifier of method {self.method.name!r}")
        layers = state.get("layers", list(self.layers))
        if list(layers) != list(self.layers):
            raise ValueError(f"the state's layers ({len(layers)}: {', '.join(list(layers)[:3])}, ...) are not this "
                             f"Sparsifier's ({len(self.layers)}: {', '.join(list(self.layers)[:3])}, ...): another model")
        if not 0 <= state["steps"] <= self.total_steps:
            raise ValueError(f"the state is at step {state['steps']}, outside this Sparsifier's 0..{self.total_steps}")


MARK = "_kronsparse"  # the attributes kronsparse sets on a parameter
HOOK_MARKS = ("_kronsparse_hooked", "_kronsparse_grad_fn")  # set by set_grad_hook, which also registers the hook
UNSHARDABLE = {"select": "removes parameters while it selects, and FSDP2 holds a fixed set",
               "iterative-pruning": "re-registers the weights (torch.nn.utils.prune), which FSDP2 holds"}


def refuse_tied(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    """A method that swaps layers would untie a tied weight: refused for the layers the user named."""
    tied = tied_weights(model)
    for name in layers:
        if name in tied:
            raise ValueError(f"layer {name!r} shares its weight with {', '.join(tied[name])}; a method that trains "
                             "Kronecker factors would untie them. Leave it dense (the default) or use a dense-weight "
                             "method, which sparsifies the shared weight with the tie kept")


def drop_missing_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Remove from the optimizer's groups and state every parameter that left the model."""
    alive = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        gone = [p for p in group["params"] if id(p) not in alive]
        group["params"] = [p for p in group["params"] if id(p) in alive]
        for p in gone:
            optimizer.state.pop(p, None)

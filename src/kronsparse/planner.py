"""Where the method pays on a user's model, before training: `plan(model, example_input)`.

For dense and for every (block shape, rank) candidate, per layer and for the whole model: trainable
parameters, optimizer-state bytes, multiply-adds of one training step and the predicted peak memory
of a training step. Nothing is trained and the model is not changed: one forward of `example_input`
(its buffers restored afterwards) counts the rows every nn.Linear sees and the bytes autograd saves
for backward; the rest is the cost model of costs.py.

The peak model (checked against benchmarks/bench_whole_step.py's allocator counts, within 10% on
its settings; tests/test_planner.py): held state (parameters, buffers, optimizer state) plus the
larger of the two peaks of a step. The backward's: the activations saved by the forward, half of
the gradients (the backward frees activations while the gradients appear) and the largest transient
of one Kronecker layer's forward + backward (costs.train_peak_bytes beyond the activations it
shares with dense: the factors' gradients and one chunk of intermediates; `materialize` also saves
W). The optimizer's: all the gradients and the temporaries of its update of the largest parameter
(torch's single-tensor Adam, its default on CPU, makes three of that size; the foreach
implementation, the default on GPUs, makes them for a whole parameter group at once, so there the
prediction is a lower bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .blocks import tiles
from .costs import choose_path, path_macs, train_params, train_peak_bytes

# optimizer: (state tensors per parameter, temporaries of a parameter's size in its single-tensor update)
OPTIMIZERS = {"adamw": (2, 3), "adam": (2, 3), "sgd": (1, 0), "sgd-nomomentum": (0, 0)}
DEFAULT_CANDIDATES = ((8, 8), (16, 16), (32, 32))
DEFAULT_RANKS = (1, 2, 4)
DENSE = "dense"


@dataclass(frozen=True)
class LayerPlan:
    """One nn.Linear under one setting (dense, or a block shape and rank)."""

    name: str
    in_features: int
    out_features: int
    rows: int  # rows (tokens) per forward of the example input
    setting: str  # "dense" or "BOxBI r R"
    dense_params: int
    path: str  # the contraction order the cost model picks ("dense" for nn.Linear)
    train_params: int
    largest_param: int  # elements of the layer's largest parameter tensor
    step_macs: int  # forward + backward multiply-adds of one step
    transient_bytes: int  # forward + backward allocations beyond the shared activations and gradients


@dataclass
class SettingPlan:
    """The whole model under one setting; sparsified layers where the block shape tiles them."""

    setting: str
    train_params: int
    optimizer_state_bytes: int
    step_macs: int
    peak_bytes: int
    layers: list[LayerPlan] = field(default_factory=list)
    saves_memory: bool = False
    saves_compute: bool = False


@dataclass
class Plan:
    settings: dict[str, SettingPlan]
    rows: dict[str, int]  # rows each nn.Linear sees per forward
    activation_bytes: int  # bytes autograd saves for backward in one forward (parameters excluded)

    def table(self) -> str:
        """A markdown table: one row per setting, its ratios to dense and what it saves."""
        dense = self.settings[DENSE]
        lines = ["| setting | train params | optimizer state MiB | step MACs | MACs x dense | predicted peak MiB | "
                 "peak x dense | saves |", "|---|---|---|---|---|---|---|---|"]
        for s in self.settings.values():
            saves = ", ".join(k for k, v in (("memory", s.saves_memory), ("compute", s.saves_compute)) if v) or "—"
            lines.append(f"| {s.setting} | {s.train_params:,} | {s.optimizer_state_bytes / 2**20:.1f} | {s.step_macs:,} | "
                         f"{s.step_macs / dense.step_macs:.2f} | {s.peak_bytes / 2**20:.1f} | "
                         f"{s.peak_bytes / dense.peak_bytes:.2f} | {saves} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def setting_name(block_shape, rank: int) -> str:
    return f"{block_shape[0]}x{block_shape[1]} r{rank}"


def _call(model: nn.Module, example_input):
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """flop_counter counts the CUDA attention kernels but not the CPU one; the same formula."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def _forward_counts(model: nn.Module, example_input) -> tuple[dict[str, int], int, int]:
    """Rows per nn.Linear, saved-activation bytes and multiply-adds (torch.utils.flop_counter) of
    one forward; the model's buffers (e.g. BatchNorm's running statistics) are restored afterwards."""
    linears = {name: m for name, m in model.named_modules() if type(m) is nn.Linear}
    rows = dict.fromkeys(linears, 0)
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: rows.__setitem__(
        name, rows[name] + args[0].numel() // mod.in_features)) for name, m in linears.items()]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and t.device.type != "meta":
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), counter:
            out = _call(model, example_input)
        del out
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    return rows, sum(saved.values()), counter.get_total_flops() // 2


def _layer_plan(name: str, layer: nn.Linear, rows: int, block_shape, rank: int | None) -> LayerPlan:
    i, o, bias = layer.in_features, layer.out_features, layer.bias is not None
    dense = o * i + (o if bias else 0)
    if block_shape is None:
        return LayerPlan(name, i, o, rows, DENSE, dense, DENSE, dense, o * i, 3 * rows * o * i, 0)
    path = choose_path(i, o, block_shape, rank, max(rows, 1))
    macs = path_macs(i, o, block_shape, rank)
    step = 3 * rows * getattr(macs, path) + (2 * macs.materialize_build if path == "materialize" else 0)
    activations = 4 * (rows * o + rows * i + (o if bias else 0))  # y, gx, the bias gradient: as dense
    transient = max(0, train_peak_bytes(i, o, block_shape, rank, max(rows, 1), path, bias=bias) - activations)
    bo, bi = block_shape
    largest = max(rank * (o // bo) * (i // bi), rank * bo * bi, o if bias else 0)  # A (S is smaller), B, bias
    return LayerPlan(name, i, o, rows, setting_name(block_shape, rank), dense, path,
                     train_params(i, o, block_shape, rank, bias), largest, step, transient)


def plan(model: nn.Module, example_input, candidates=DEFAULT_CANDIDATES, ranks=DEFAULT_RANKS,
         layers=None, optimizer: str = "adamw") -> Plan:
    """Predicted costs of training `model` dense and with the kron method at every (block shape,
    rank), on batches like `example_input` (a tensor, a tuple of positional inputs or a dict of
    keyword inputs; include the labels if the model computes its loss). `layers`: a
    (name, module) -> bool filter of the nn.Linear layers to sparsify (default: all that the block
    shape tiles). fp32 training is assumed; `optimizer` is "adamw", "adam", "sgd" (momentum) or
    "sgd-nomomentum". Ranks above a layer's full Kronecker rank min(bo*bi, m1*n1) are skipped."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    rows, activation_bytes, forward_macs = _forward_counts(model, example_input)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and (layers is None or layers(n, m))}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    frozen_bytes += sum(b.numel() * b.element_size() for b in model.buffers())
    planned_macs = sum(rows[n] * m.in_features * m.out_features for n, m in linears.items())
    unplanned_macs = forward_macs - planned_macs  # attention, the layers not planned: alike in every setting
    planned = {id(q) for m in linears.values() for q in m.parameters()}
    largest_other = max((q.numel() for q in model.parameters() if q.requires_grad and id(q) not in planned), default=0)
    states, temporaries = OPTIMIZERS[optimizer]
    other = dict(trainable=trainable, frozen_bytes=frozen_bytes, activation_bytes=activation_bytes, states=states,
                 update_bytes=4 * temporaries, largest_other=largest_other, other_macs=3 * max(0, unplanned_macs))
    settings = {DENSE: _setting(DENSE, [_layer_plan(n, m, rows[n], None, None) for n, m in linears.items()], **other)}
    for block in candidates:
        block = tuple(block)
        for rank in ranks:
            if not any(tiles(m.in_features, m.out_features, block) and rank <= _full_rank(m, block)
                       for m in linears.values()):
                continue
            plans = [_layer_plan(n, m, rows[n], block if _fits(m, block, rank) else None, rank)
                     for n, m in linears.items()]
            settings[setting_name(block, rank)] = _setting(setting_name(block, rank), plans, **other)
    dense = settings[DENSE]
    for s in settings.values():
        s.saves_memory = s.peak_bytes < dense.peak_bytes
        s.saves_compute = s.step_macs < dense.step_macs
    return Plan(settings, rows, activation_bytes)


def _full_rank(layer: nn.Linear, block) -> int:
    bo, bi = block
    return min(bo * bi, (layer.out_features // bo) * (layer.in_features // bi))


def _fits(layer: nn.Linear, block, rank: int) -> bool:
    return tiles(layer.in_features, layer.out_features, block) and rank <= _full_rank(layer, block)


def _setting(name: str, layers: list[LayerPlan], trainable: int, frozen_bytes: int, activation_bytes: int,
             states: int, update_bytes: int, largest_other: int, other_macs: int) -> SettingPlan:
    """Whole-model totals: the planned layers' parameters replace the dense ones in the count; the
    model's other work (attention, norms, the layers not planned) is the same under every setting."""
    params = trainable + sum(lp.train_params - lp.dense_params for lp in layers)
    param_bytes = 4 * params
    optimizer_bytes = states * param_bytes
    extra_saved = sum(4 * lp.out_features * lp.in_features for lp in layers if lp.path == "materialize")
    transient = max((lp.transient_bytes for lp in layers), default=0)
    backward = activation_bytes + extra_saved + param_bytes // 2 + transient
    largest = max([largest_other, *(lp.largest_param for lp in layers)])
    update = param_bytes + update_bytes * largest
    peak = frozen_bytes + param_bytes + optimizer_bytes + max(backward, update)
    return SettingPlan(name, params, optimizer_bytes, sum(lp.step_macs for lp in layers) + other_macs, peak, layers)

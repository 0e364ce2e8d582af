"""Every method on every architecture of tests/architectures.py (issue 25): train 20 AdamW steps,
finalize, the exact sparsity recounted from the dense weights, a resume from the state at an early
step, mid-sparsifying and after the sparsifying phase that ends bit-identical to the uninterrupted
run, squash to a plain model with the same outputs and the model's own module types, and the dense
and BSR exports read back into a fresh model with the same outputs."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from architectures import ARCHITECTURES  # noqa: E402

from kronsparse import Sparsifier  # noqa: E402
from kronsparse.export import read_export  # noqa: E402
from kronsparse.inference import replace_layers_  # noqa: E402
from kronsparse.layers import KronConv2d, KronLinear, KronSelectLinear  # noqa: E402
from kronsparse.methods.schedules import Every  # noqa: E402

STEPS, TARGET, BLOCK = 20, 0.5, (4, 4)
CHECKPOINTS = (3, 8, 16)  # early; mid-sparsifying (the phase is 14 steps); after it
METHODS = {
    "kron": {"rank": 2},
    "select": {"rank": 1, "candidates": ((4, 4), (2, 8))},
    "group-lasso": {},
    "elastic-group-lasso": {},
    "rigl": {},
    "iterative-pruning": {},
    "block-magnitude": {},
    "dense": {},
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return ARCHITECTURES[request.param]()


def build(arch, method: str, seed: int = 0):
    model = arch.model(seed)
    target = None if method == "dense" else TARGET
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # coverage warnings of the tiny CNNs
        sp = Sparsifier(model, method, block_shape=BLOCK, target_sparsity=target, total_steps=STEPS, **METHODS[method])
    if method == "rigl":  # mask updates every 5 steps instead of 100, so that 20 steps hold some
        sp.method.is_update = Every(5, sp.method.is_update.end)
    return model, sp, sp.optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)


def train(arch, model, sp, opt, start: int, stop: int, keep=()) -> dict[int, bytes]:
    saved = {}
    model.train()
    for step in range(start, stop):
        opt.zero_grad()
        arch.loss(model, arch.batch(step)).backward()
        opt.step()
        sp.step(opt)
        if step + 1 in keep:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sp": sp.state_dict()}, buf)
            saved[step + 1] = buf.getvalue()
    return saved


def resume(arch, method: str, blob: bytes):
    state = torch.load(io.BytesIO(blob), weights_only=True)
    model, sp, opt = build(arch, method, seed=1)  # another init: everything must come from the state
    sp.load_state_dict(state["sp"], opt)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return model, sp, opt


def matrix_of(module: nn.Module) -> torch.Tensor:
    """The dense weight in (out, in[*kh*kw]) order, recomputed here from the module itself."""
    if isinstance(module, (KronLinear, KronConv2d)):
        W = module.dense_weight()
    elif type(module).__name__ == "Conv1D":
        W = module.weight.t()
    else:
        W = module.weight
    return W.detach().flatten(1)


def zero_blocks(module: nn.Module, block) -> tuple[int, int]:
    W = matrix_of(module)
    bo = block[0]
    bi = W.shape[1] // (module_in(module) // block[1])
    tiles = W.reshape(W.shape[0] // bo, bo, W.shape[1] // bi, bi).abs().amax(dim=(1, 3))
    return int((tiles == 0).sum()), tiles.numel()


def module_in(module: nn.Module) -> int:
    if hasattr(module, "in_channels"):
        return module.in_channels
    return module.weight.shape[0] if type(module).__name__ == "Conv1D" else module.in_features


def check_sparsity(model, sp, method):
    layers = {n: model.get_submodule(n) for n in sp.layers}
    assert layers
    for name, layer in layers.items():
        zero, blocks = zero_blocks(layer, sp.block_shape)
        if method == "iterative-pruning":
            W = matrix_of(layer)
            assert int((W == 0).sum()) == math.ceil(TARGET * W.numel()), name
        elif method == "dense":
            assert zero == 0, name
        else:
            assert zero == math.ceil(TARGET * blocks), (name, zero, blocks)


def outputs(arch, model):
    model.eval()
    with torch.no_grad():
        return arch.output(model, arch.batch(999))


def module_types(model) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules()})


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_every_architecture(arch, method, tmp_path):
    model, sp, opt = build(arch, method)
    saved = train(arch, model, sp, opt, 0, STEPS, keep=CHECKPOINTS)
    sp.finalize(opt)
    check_sparsity(model, sp, method)
    final = {k: v.clone() for k, v in model.state_dict().items()}

    for at, blob in saved.items():  # resumed at any step, the run ends bit-identical
        m2, sp2, opt2 = resume(arch, method, blob)
        train(arch, m2, sp2, opt2, at, STEPS)
        sp2.finalize(opt2)
        state = m2.state_dict()
        assert state.keys() == final.keys(), at
        for k, v in final.items():
            assert torch.equal(state[k], v), (at, k)

    before = outputs(arch, model)
    sp.squash()  # a plain model: the model's own module types, the same outputs and zero blocks
    assert not any(isinstance(m, (KronLinear, KronConv2d, KronSelectLinear)) for m in model.modules())
    assert module_types(model) == module_types(arch.model())
    torch.testing.assert_close(outputs(arch, model), before, rtol=1e-5, atol=1e-5)
    check_sparsity(model, sp, method)
    squashed = outputs(arch, model)

    meta, tensors = read_export(sp.export(tmp_path / "dense.safetensors", "dense"))
    fresh = arch.model(seed=2)
    fresh.load_state_dict(tensors)  # the dense export is the plain model's own state_dict
    assert torch.equal(outputs(arch, fresh), squashed)

    fresh = replace_layers_(arch.model(seed=2), sp.export(tmp_path / "bsr.safetensors", "bsr"))
    torch.testing.assert_close(outputs(arch, fresh), squashed, rtol=1e-5, atol=1e-5)
    if method != "dense" and method != "iterative-pruning":
        assert any(m["stored"] == "bsr" for m in read_export(tmp_path / "bsr.safetensors")[0]["layers"].values())

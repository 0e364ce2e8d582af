"""The penalty does the pruning (issue 26): with the default steering ("track") the zero fraction of
kron, group lasso and elastic group lasso follows the ramp through the proximal step itself, under
SGD and AdamW, on a one-layer and a three-layer model, in runs of 200, 1,000 and 5,000 steps; the
final top-up is a last resort (at most 10% of the zero blocks). Counts come from the dense weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kronsparse import Sparsifier

TARGET = 0.5
METHODS = ("kron", "group-lasso", "elastic-group-lasso")


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "one-layer":
        return nn.Sequential(nn.Linear(32, 8))
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


def _optimizer(sp: Sparsifier, name: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return sp.optimizer(torch.optim.SGD, lr=0.05, momentum=0.9)
    return sp.optimizer(torch.optim.AdamW, lr=1e-3)


def _run(method: str, kind: str, opt_name: str, steps: int, steering: str = "track"):
    """Train on a fixed synthetic task; the zero fraction and the ramp at 25/50/75% of the sparsifying phase."""
    model = _model(kind)
    g = torch.Generator().manual_seed(3)
    d_in, classes = (32, 8) if kind == "one-layer" else (16, 4)
    x = torch.randn(256, d_in, generator=g)
    y = (x @ torch.randn(d_in, classes, generator=g)).argmax(1)
    sp = Sparsifier(model, method, block_shape=(2, 2), target_sparsity=TARGET, total_steps=steps, steering=steering)
    opt = _optimizer(sp, opt_name)
    checks = {int(f * sp.method.sparsify_steps) for f in (0.25, 0.5, 0.75)}
    seen = []
    for step in range(steps):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        sp.step(opt)
        if step in checks:
            seen.append((sp.block_sparsity(), sp.method.steering.schedule(step)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp.finalize()
    return sp, seen


def _check(sp: Sparsifier, seen: list) -> None:
    assert sp.block_sparsity() == pytest.approx(TARGET)
    for zero, ramp in seen:
        assert abs(zero - ramp) <= 0.05, seen
    assert sp.topup_share()["total"] <= 0.10, sp.topup_share()


@pytest.mark.parametrize("steps", [200, 1000])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["one-layer", "deep"])
@pytest.mark.parametrize("method", METHODS)
def test_the_penalty_follows_the_ramp(method, kind, opt_name, steps):
    _check(*_run(method, kind, opt_name, steps))


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("kind", ["one-layer", "deep"])
@pytest.mark.parametrize("method", METHODS)
def test_the_penalty_follows_the_ramp_in_long_runs(method, kind, opt_name):
    _check(*_run(method, kind, opt_name, 5000))


def test_topup_share_counts_the_topped_up_blocks_and_warns_when_they_dominate():
    """The steering before issue 26 ("legacy", still available by name) leaves a 200-step run's
    pruning to the top-up; the Sparsifier says so (share per layer from the recounted zeros) and warns."""
    model = _model("deep")
    sp = Sparsifier(model, "kron", block_shape=(2, 2), target_sparsity=TARGET, total_steps=200, steering="legacy")
    opt = _optimizer(sp, "adamw")
    x = torch.randn(32, 16)
    for _ in range(200):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sp.step(opt)
    with pytest.warns(UserWarning, match="top-up made"):
        sp.finalize()
    share = sp.topup_share()
    zeros = {name: round(s * sp.method.masks[k].numel()) for k, (name, s) in enumerate(sp.layer_sparsity().items())}
    assert share["total"] == pytest.approx(sp.method.topped_up / sum(zeros.values()))
    for k, name in enumerate(sp.method.names):
        assert share["layers"][name] == pytest.approx(sp.method.topped_up_layers[k] / zeros[name])
    assert share["total"] > 0.5
    summary = sp.summary()  # the summary's rows carry the same counts, and print them
    rows = {r.name: r for r in summary.layers if r.sparsified}
    for k, name in enumerate(sp.method.names):
        assert rows[name].stats["topped_up_blocks"] == sp.method.topped_up_layers[k]
        assert f"({sp.method.topped_up_layers[k]} of {rows[name].stats['zero_blocks']} from the final top-up)" in str(summary)


def test_prune_steering_is_magnitude_pruning_without_a_penalty():
    """"prune": lambda stays 0 and the zeros follow the ramp all the same (the ablation's baseline)."""
    sp, seen = _run("kron", "deep", "adamw", 200, steering="prune")
    assert set(sp.method.lams) == {0.0}
    _check(sp, seen)


def test_an_unknown_steering_is_refused():
    with pytest.raises(ValueError, match="unknown steering 'fast'"):
        Sparsifier(_model("deep"), "kron", block_shape=(2, 2), target_sparsity=0.5, total_steps=10, steering="fast")


def test_a_lambda_given_with_a_target_is_not_silently_ignored():
    with pytest.warns(UserWarning, match="lam=0.01 is ignored"):
        Sparsifier(_model("deep"), "kron", block_shape=(2, 2), target_sparsity=0.5, total_steps=10, lam=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the legacy steering starts from it; without a target it is the lambda
        Sparsifier(_model("deep"), "kron", block_shape=(2, 2), target_sparsity=0.5, total_steps=10, lam=0.01,
                   steering="legacy")
        Sparsifier(_model("deep"), "group-lasso", block_shape=(2, 2), total_steps=10, lam=0.01)

"""The method on a planted problem: the l1 prox on S finds the zero blocks a teacher planted."""

import pytest
import torch

from kronsparse.functional import kron_weight
from kronsparse.layers import KronLinear
from kronsparse.methods.kron import KronMethod, KronOptions, resolve_scale_pin
from kronsparse.model_tree import weight_layers
from kronsparse.sparsifier import Sparsifier
from kronsparse.training import models
from kronsparse.training.models import FeedForward, build_model, dense_factory, kron_factory


def fit(lam: float | None, weight_decay: float, target=None, steps: int = 400, scale_pin: str = "decay"):
    """Regress onto a rank-2 Kronecker teacher with ~40% of its (2, 4) blocks planted at zero."""
    torch.manual_seed(0)
    planted = torch.rand(4, 8) < 0.5
    teacher = kron_weight(planted.float(), torch.randn(2, 4, 8), torch.randn(2, 2, 4))
    x = torch.randn(256, 32)
    y = x @ teacher.t()
    model = FeedForward([KronLinear(32, 8, (2, 4), 2, bias=False)])
    sp = Sparsifier(model, "kron", block_shape=(2, 4), rank=2, lam=lam, target_sparsity=target,
                    weight_decay=weight_decay, sparsify_fraction=1.0 if target is None else 0.8, scale_pin=scale_pin,
                    total_steps=steps)
    opt = sp.optimizer(torch.optim.SGD, lr=0.02, momentum=0.9)
    for step in range(steps):
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step(opt)
    return model.layers[0], planted, sp.method


def test_block_sparsity_grows_with_lambda_and_recovers_the_planted_mask():
    sparsity = []
    for lam in (0.0, 0.1, 0.3):
        layer, planted, _ = fit(lam, 1e-2)
        sparsity.append(1 - layer.block_mask().float().mean().item())
    assert sparsity[0] == 0.0 < sparsity[1] < sparsity[2]
    assert torch.equal(layer.block_mask(), planted)  # lambda = 0.3: exactly the teacher's blocks
    assert torch.equal(layer.block_mask(), layer.S != 0)


def test_weight_decay_on_A_and_B_keeps_the_scale_from_escaping_into_A():
    pinned, _, _ = fit(0.3, 1e-2)
    free, _, _ = fit(0.3, 0.0)
    assert pinned.A.norm() < 0.8 * free.A.norm()


def test_target_sparsity_is_reached_exactly_and_pruned_blocks_stay_pruned():
    layer, planted, method = fit(None, 1e-2, target=0.25, steps=3000)
    assert method.topped_up == 0  # steering reached the target by the proximal step alone
    zero = (~layer.block_mask()).sum().item()
    assert zero == 8  # ceil(0.25 * 32)
    assert torch.equal(~layer.block_mask(), ~method.masks[0])
    assert (~layer.block_mask() & planted).sum() == 0  # it pruned only blocks the teacher had zeroed


def test_state_dict_round_trip():
    _, _, method = fit(0.1, 1e-2, steps=50)
    fresh = KronMethod(method.options, 50)
    fresh.prepare(FeedForward([KronLinear(32, 8, (2, 4), 2, bias=False)]))
    fresh.load_state_dict(method.state_dict())
    assert fresh.lam == method.lam and all(torch.equal(a, b) for a, b in zip(fresh.masks, method.masks))


def test_norm_scale_pin_keeps_the_weight_and_puts_each_block_size_in_S():
    cfg = KronOptions(block_shape=(2, 4), rank=2, target_sparsity=0.5, scale_pin="norm")
    model = FeedForward([KronLinear(32, 8, (2, 4), 2, bias=False)])
    layer = model.layers[0]
    before = layer.dense_weight().detach().clone()
    KronMethod(cfg, 100).prepare(model)
    torch.testing.assert_close(layer.dense_weight(), before)
    torch.testing.assert_close(torch.linalg.vector_norm(layer.A, dim=0), torch.ones(4, 8))
    block_sizes = before.reshape(4, 2, 8, 4).square().sum(dim=(1, 3)).sqrt()
    assert torch.corrcoef(torch.stack([layer.S.abs().flatten(), block_sizes.flatten()]))[0, 1] > 0.5


def test_norm_scale_pin_reaches_the_target_and_prunes_only_planted_blocks():
    layer, planted, method = fit(None, 1e-2, target=0.25, steps=3000, scale_pin="norm")
    assert (~layer.block_mask()).sum().item() == 8  # ceil(0.25 * 32)
    assert (~layer.block_mask() & planted).sum() == 0


def test_each_layer_tracks_the_ramp_with_its_own_lambda():
    """"track": each layer's threshold comes from its own |S| (the k-th smallest over 10 steps), so a
    layer of tiny S gets a tiny lambda and one of large S a large one; lambda = threshold / lr."""
    cfg = KronOptions(block_shape=(2, 2), rank=2, target_sparsity=0.5, scale_pin="decay")
    model = FeedForward([KronLinear(16, 8, (2, 2), 2), KronLinear(8, 4, (2, 2), 2)])
    method = KronMethod(cfg, 1000)
    method.prepare(model)
    with torch.no_grad():
        model.layers[0].S.fill_(1e-3)
        model.layers[1].S.fill_(10.0)
    method.step(None, 300, 0.01)  # inside the ramp (it starts at 25% of the 700 sparsifying steps)
    assert method.lams[0] == pytest.approx(1e-3 / 10 / 0.01) and method.lams[1] == pytest.approx(10.0 / 10 / 0.01)
    fresh = KronMethod(cfg, 1000)
    fresh.prepare(FeedForward([KronLinear(16, 8, (2, 2), 2), KronLinear(8, 4, (2, 2), 2)]))
    fresh.load_state_dict(method.state_dict())
    assert fresh.lams == method.lams and fresh.steering.gains == method.steering.gains


def test_each_layer_steers_its_own_lambda():
    """"legacy": a layer whose prox zeroes too much gets a smaller lambda, one that zeroes too little a larger one."""
    cfg = KronOptions(block_shape=(2, 2), rank=2, target_sparsity=0.5, scale_pin="decay", steering="legacy")
    model = FeedForward([KronLinear(16, 8, (2, 2), 2), KronLinear(8, 4, (2, 2), 2)])
    method = KronMethod(cfg, 1000)
    method.prepare(model)
    with torch.no_grad():
        model.layers[0].S.fill_(1e-9)  # every block would be zeroed: more than the ramp allows
        model.layers[1].S.fill_(1e3)  # no block would be zeroed
    start = method.lams[0]
    method.step(None, 100, 0.01)
    assert method.lams[0] < start < method.lams[1]
    assert not (model.layers[0].S == 0).all()  # the cap kept the blocks the ramp does not yet allow
    fresh = KronMethod(cfg, 1000)
    fresh.prepare(FeedForward([KronLinear(16, 8, (2, 2), 2), KronLinear(8, 4, (2, 2), 2)]))
    fresh.load_state_dict(method.state_dict())
    assert fresh.lams == method.lams


@pytest.mark.parametrize("model,pin,expected", [("linear", "auto", "decay"), ("mlp", "auto", "norm"),
                                                ("lenet5", "auto", "norm"), ("linear", "norm", "norm"),
                                                ("mlp", "decay", "decay")])
def test_auto_scale_pin_is_decay_only_for_the_one_layer_model(model, pin, expected):
    net = build_model(model, kron_factory((2, 2), 2))
    method = KronMethod(KronOptions(scale_pin=pin, target_sparsity=0.5), 100)
    method.prepare(net)
    assert method.pin == expected and method.summary()["scale_pin"] == expected
    # the ramp waits a quarter of the phase for |S| to mean something; only the legacy steering with
    # the "decay" pin starts at once (its lambda needed that time to grow anyway)
    assert method.steering.schedule.start > 0
    legacy = KronMethod(KronOptions(scale_pin=pin, target_sparsity=0.5, steering="legacy"), 100)
    legacy.prepare(build_model(model, kron_factory((2, 2), 2)))
    assert (legacy.steering.schedule.start > 0) == (expected == "norm")


@pytest.mark.parametrize("name", ["linear", "mlp", "lenet5", "vit", "vit-tiny"])
def test_the_app_pins_the_scale_of_each_of_its_models_as_the_method_does(name):
    """The reports name a run's scale pin without building its model (training.models.resolve_scale_pin
    counts its weight layers); the method decides on the built model. They must agree."""
    model = build_model(name, dense_factory)
    assert models.weight_layer_count(name) == len(weight_layers(model))
    assert models.resolve_scale_pin("auto", name) == resolve_scale_pin("auto", model)
    assert models.resolve_scale_pin("norm", name) == "norm"

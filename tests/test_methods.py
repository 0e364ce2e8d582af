"""The baselines: exact masks of the proximal maps, RigL's invariants, block alignment of the
torch.ao sparsifier, bit-identical resume, and short real-MNIST runs checked from the saved weights."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kronsparse.functional import block_mask_of, expand_block_mask
from kronsparse.methods import METHODS, get_method
from kronsparse.methods.block_magnitude import BlockMagnitudeMethod
from kronsparse.methods.elastic_group_lasso import ElasticGroupLassoMethod
from kronsparse.methods.group_lasso import GroupLassoMethod
from kronsparse.methods.rigl import RigLMethod, layer_zero_counts, update_block_mask
from kronsparse.methods.schedules import CosineDecay, Every, Rounds
from kronsparse.training import data
from kronsparse.training.config import TrainConfig
from kronsparse.training.models import FeedForward
from kronsparse.training.train import Run, train

BASELINES = ["group-lasso", "elastic-group-lasso", "rigl", "iterative-pruning", "block-magnitude"]


def blocks_of(values, block_shape):
    """A weight whose (p, q) block is the constant `values[p][q]`."""
    return expand_block_mask(torch.tensor(values, dtype=torch.float32), block_shape)


def options(method, **kw):
    """The options of `method` (what a Sparsifier builds from its keyword arguments)."""
    return get_method(method).Options(**kw)


def prepared(method_cls, cfg, sizes, total_steps=10):
    """A method prepared on FeedForward([Linear(sizes[0], sizes[1]), ...]) with fixed weights."""
    torch.manual_seed(0)
    model = FeedForward([nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:])])
    method = method_cls(cfg, total_steps)
    method.prepare(model)
    return method, model


# --------------------------------------------------------------------------------------------
# Proximal maps
# --------------------------------------------------------------------------------------------


def test_group_lasso_prox_exact_mask_and_values():
    method = GroupLassoMethod(options("group-lasso", block_shape=(2, 2), lam=1.0), 10)
    # block norms 2 * value; group threshold = t * sqrt(4) = 2t = 1 for t = 0.5
    W = blocks_of([[0.25, 0.5], [1.0, -2.0]], (2, 2))
    out = method.prox(W, 0.5)
    assert torch.equal(block_mask_of(out, (2, 2)), torch.tensor([[False, False], [True, True]]))
    torch.testing.assert_close(out, blocks_of([[0.0, 0.0], [0.5, -1.5]], (2, 2)))


def test_elastic_group_lasso_prox_soft_thresholds_then_shrinks():
    method = ElasticGroupLassoMethod(options("elastic-group-lasso", block_shape=(2, 2), lam=1.0), 10)
    method.l1_ratio = 32.0  # l1 threshold t * 32 / 16 = 2t = 1, group threshold 2t = 1 (t = 0.5)
    W = torch.tensor([[4.0, 1.0, 1.5, -1.5],
                      [0.5, 0.0, 0.5, 0.0],
                      [2.0, 0.0, -3.0, -3.0],
                      [0.0, 0.0, -3.0, -3.0]])
    out = method.prox(W, 0.5)
    # soft-threshold first: block (0,0) -> [[3,0],[0,0]] (norm 3, scaled by 2/3); block (0,1) -> norm
    # 0.71 < 1, zero; block (1,0) -> norm 1, exactly zero; block (1,1) -> all -2 (norm 4, scaled by 3/4)
    expected = torch.tensor([[2.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, -1.5, -1.5],
                             [0.0, 0.0, -1.5, -1.5]])
    assert torch.equal(out != 0, expected != 0)
    torch.testing.assert_close(out, expected)
    # the group shrink alone keeps block (0, 1) (norm 2.18) and (1, 0) (norm 2): order matters
    assert block_mask_of(GroupLassoMethod.prox(method, W, 0.5), (2, 2)).all()


def test_group_lasso_cap_keeps_the_largest_excess_block_and_top_up_prunes_the_smallest():
    # the legacy steering: lambda as given (the default "track" sets it from the block norms)
    cfg = options("group-lasso", block_shape=(2, 2), target_sparsity=0.5, lam=2.0, sparsify_fraction=1.0,
                  steering="legacy")
    method, model = prepared(GroupLassoMethod, cfg, (4, 4), total_steps=1)  # ramp 0 steps: cap = 2 of 4
    W = blocks_of([[0.05, 0.1], [0.15, 2.5]], (2, 2))  # block norms 0.1, 0.2, 0.3, 5
    model.layers[0].weight.data.copy_(W)
    method.step(None, 0, 0.1)  # threshold 0.1 * 2 * 2 = 0.4 would zero three blocks
    out = model.layers[0].weight.detach()
    assert torch.equal(block_mask_of(out, (2, 2)), torch.tensor([[False, False], [True, True]]))
    assert torch.equal(out[2:, :2], W[2:, :2])  # the largest of the three kept its value this step
    torch.testing.assert_close(out[2:, 2:], W[2:, 2:] * (1 - 0.4 / 5))
    assert torch.equal(method.masks[0], block_mask_of(out, (2, 2)))  # frozen at the phase's end

    cfg = options("group-lasso", block_shape=(2, 2), target_sparsity=0.5, lam=1e-6, sparsify_fraction=1.0,
                  steering="legacy")
    method, model = prepared(GroupLassoMethod, cfg, (4, 4), total_steps=1)
    model.layers[0].weight.data.copy_(blocks_of([[0.3, 0.1], [2.0, 0.2]], (2, 2)))
    method.step(None, 0, 0.1)
    assert method.topped_up == 2
    assert torch.equal(method.masks[0], torch.tensor([[True, False], [True, False]]))


def test_group_lasso_blocks_may_revive_while_sparsifying_but_not_after_the_freeze():
    cfg = options("group-lasso", block_shape=(2, 2), lam=1.0, sparsify_fraction=0.5)
    method, model = prepared(GroupLassoMethod, cfg, (4, 4), total_steps=4)  # sparsify steps 0, 1
    layer = model.layers[0]
    layer.weight.data.copy_(blocks_of([[0.005, 1.0], [1.0, 1.0]], (2, 2)))
    method.step(None, 0, 0.01)  # threshold 0.02: block (0, 0) (norm 0.01) -> 0
    assert not block_mask_of(layer.weight, (2, 2))[0, 0]
    layer.weight.data[0, 0] = 0.5  # a gradient step revives it
    method.step(None, 1, 0.01)  # the prox keeps it (norm 0.5 > 0.02); the mask freezes
    assert block_mask_of(layer.weight, (2, 2)).all()
    layer.weight.data.copy_(blocks_of([[0.5, 1.0], [1.0, 1.0]], (2, 2)))
    method.masks[0][1, 1] = False
    method.step(None, 2, 0.01)  # frozen: masked blocks re-zeroed, no prox
    assert torch.equal(layer.weight, blocks_of([[0.5, 1.0], [1.0, 0.0]], (2, 2)))


# --------------------------------------------------------------------------------------------
# RigL
# --------------------------------------------------------------------------------------------


def test_rigl_mask_update_asserts_its_invariants():
    mask = torch.tensor([True, True, False, False])
    assert torch.equal(update_block_mask(mask, torch.tensor([True, False, False, False]),
                                         torch.tensor([False, False, True, False])),
                       torch.tensor([False, True, True, False]))
    with pytest.raises(AssertionError, match="overlap"):
        update_block_mask(mask, torch.tensor([True, False, False, False]), torch.tensor([True, False, False, False]))
    with pytest.raises(AssertionError, match="active blocks changed"):
        update_block_mask(mask, torch.tensor([True, False, False, False]), torch.tensor([False, False, True, True]))


def test_rigl_schedules_and_layer_split():
    drop = CosineDecay(0.3, 100)
    assert drop(0) == pytest.approx(0.3) and drop(50) == pytest.approx(0.15) and drop(100) == 0.0
    every = Every(100, 750)
    assert [t for t in range(1000) if every(t)] == [100, 200, 300, 400, 500, 600, 700]
    assert Rounds(5, 22).steps() == [3, 8, 12, 17, 21]
    assert layer_zero_counts(9, [12, 6]) == [6, 3] and sum(layer_zero_counts(7, [5, 5, 3])) == 7


def test_rigl_active_block_counts_stay_exact_over_many_updates():
    cfg = options("rigl", block_shape=(2, 2), target_sparsity=0.5)
    method, model = prepared(RigLMethod, cfg, (8, 6, 4), total_steps=120)
    method.is_update = Every(2, 90)
    opt = torch.optim.SGD(method.param_groups(model), lr=0.1, momentum=0.9)
    first = [m.clone() for m in method.masks]
    assert [int(m.sum()) for m in first] == [6, 3]  # 9 of 18 blocks zero, split 6 + 3
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)
    for step in range(120):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.step(opt, step, 0.1)
        for layer, mask in zip(method.layers, method.masks):
            assert int(mask.sum()) == mask.numel() // 2
            assert torch.equal(block_mask_of(layer.weight, (2, 2)) & ~mask, torch.zeros_like(mask))
    assert method.updates == 44
    assert any(not torch.equal(a, b) for a, b in zip(first, method.masks))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rigl_grown_blocks_start_at_zero_with_zero_optimizer_state(optimizer):
    cfg = options("rigl", block_shape=(2, 2), target_sparsity=0.5)
    method, model = prepared(RigLMethod, cfg, (4, 4))
    layer = model.layers[0]
    method.masks = [torch.tensor([[True, True], [False, False]])]
    method._expand()
    layer.weight.data.copy_(blocks_of([[0.1, 2.0], [7.0, 7.0]], (2, 2)))
    opt = (torch.optim.SGD(method.param_groups(model), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(method.param_groups(model), lr=0.1))
    G = blocks_of([[1.0, 1.0], [2.0, 3.0]], (2, 2))
    for step in range(3):  # a few ordinary steps fill the optimizer state of the active blocks
        opt.zero_grad()
        (layer.weight * G).sum().backward()  # gradient G, through the method's gradient hook
        opt.step()
        method.step(opt, step, 0.1)
    state = [v for v in opt.state[layer.weight].values() if v.shape == layer.weight.shape]
    assert all(s[:2].ne(0).all() and not s[2:].any() for s in state)
    assert not layer.weight[2:].any()
    method.grads = [blocks_of([[0.0, 0.0], [1.0, 3.0]], (2, 2))]  # the dense gradient of an update step
    method.update_masks(opt, 0.5)  # drop 1 of 2 active: (0, 0), the smaller; grow (1, 1), the larger grad
    assert torch.equal(method.masks[0], torch.tensor([[False, True], [False, True]]))
    assert not layer.weight[:2, :2].any() and not layer.weight[2:].any()
    for s in state:
        assert not s[:2, :2].any() and not s[2:, 2:].any() and s[:2, 2:].ne(0).all()
    opt.zero_grad()
    (layer.weight * G).sum().backward()
    opt.step()
    method.step(opt, 3, 0.1)
    assert layer.weight[2:, 2:].ne(0).all() and not layer.weight[:2, :2].any()


# --------------------------------------------------------------------------------------------
# torch.ao's block sparsifier on our grid
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block_shape", [(2, 4), (4, 2), (1, 1)])
def test_block_magnitude_zero_blocks_are_our_grid(block_shape):
    bo, bi = block_shape
    cfg = options("block-magnitude", block_shape=block_shape, target_sparsity=0.5, sparsify_fraction=1.0)
    method, model = prepared(BlockMagnitudeMethod, cfg, (8, 8), total_steps=1)
    m1, n1 = 8 // bo, 8 // bi
    norms = torch.randperm(m1 * n1, generator=torch.Generator().manual_seed(0)).float().add(1).view(m1, n1)
    with torch.no_grad():
        model.layers[0].parametrizations.weight.original.copy_(blocks_of(norms.tolist(), block_shape))
    method.step(None, 0, 0.1)  # the last sparsifying step: level = target
    method.finalize()  # squash: plain weights with exact zero blocks
    W = model.layers[0].weight
    assert isinstance(W, nn.Parameter) and not hasattr(model.layers[0], "parametrizations")
    expected = norms > norms.flatten().kthvalue(m1 * n1 // 2).values
    assert torch.equal(block_mask_of(W, block_shape), expected)
    assert torch.equal(W != 0, expand_block_mask(expected, block_shape))


# --------------------------------------------------------------------------------------------
# Resume: state_dict round trip
# --------------------------------------------------------------------------------------------


def synthetic(n=64, features=16, classes=4):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, features, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return data.Dataset("synthetic", x, y, x[:16], y[:16], classes)


@pytest.mark.parametrize("method", BASELINES)
def test_state_dict_round_trip_resumes_bit_identically(method, monkeypatch):
    monkeypatch.setattr(RigLMethod, "delta_t", 4)
    ds = synthetic()
    cfg = TrainConfig(method=method, block_shape=(2, 2), target_sparsity=0.5, batch_size=8, epochs=4, lr=0.1)
    batches = [(ds.x_train[i::8], ds.y_train[i::8]) for i in range(8)] * 4  # 32 steps; sparsify 22
    k = 10
    a = Run(cfg, ds, torch.device("cpu"))
    for xb, yb in batches[:k]:
        a.train_step(xb, yb)
    saved = copy.deepcopy({"sparsifier": a.sparsifier.state_dict(), "model": a.model.state_dict(),
                           "optimizer": a.optimizer.state_dict(), "step": a.step})
    for xb, yb in batches[k:]:
        a.train_step(xb, yb)
    a.sparsifier.finalize(a.optimizer)
    b = Run(cfg, ds, torch.device("cpu"))
    b.sparsifier.load_state_dict(saved["sparsifier"], b.optimizer)
    b.model.load_state_dict(saved["model"])
    b.optimizer.load_state_dict(saved["optimizer"])
    b.step = saved["step"]
    for xb, yb in batches[k:]:
        b.train_step(xb, yb)
    b.sparsifier.finalize(b.optimizer)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert set(sa) == {"layers.0.weight", "layers.0.bias"} == set(sb)  # reparametrisations removed
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    W = sa["layers.0.weight"]  # (4, 16): 64 weights, 16 blocks; target 0.5
    if method == "iterative-pruning":
        assert int((W == 0).sum()) == 32
    else:
        assert int((~block_mask_of(W, (2, 2))).sum()) == 8
    ma, mb = a.method.state_dict(), b.method.state_dict()
    assert ma.keys() == mb.keys()
    for key in ma:
        va, vb = ma[key], mb[key]
        if isinstance(va, list):
            assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(va, vb)), key
        elif torch.is_tensor(va):
            assert torch.equal(va, vb), key
        else:
            assert va == vb, key
    if method == "rigl":
        assert a.method.updates == 5  # steps 4, 8, ..., 20 (end at 75% of 32 = 24): some before and after k


# --------------------------------------------------------------------------------------------
# Real MNIST, checked from the saved weights
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_test():
    ds = data.subset(data.load_dataset("mnist", download=False), 2000, 500)
    return ds.x_test, ds.y_test


@pytest.mark.parametrize("method", BASELINES + ["dense"])
def test_short_mnist_run_agrees_with_its_saved_weights(method, tmp_path, mnist_test):
    cfg = TrainConfig(method=method, block_shape=(2, 2), target_sparsity=0.5, n_train=2000, n_test=500, epochs=1)
    train(cfg, out=tmp_path, progress=False)
    m = json.loads((tmp_path / "metrics.json").read_text())
    t = load_file(str(tmp_path / "model.safetensors"))
    assert set(t) == {"weight", "bias"}
    x, y = mnist_test
    x = (x - m["input_mean"]) / m["input_std"]  # inputs are standardised by default, as metrics.json records
    W, b = t["weight"], t["bias"]
    acc = (nn.functional.linear(x, W, b).argmax(1) == y).sum().item() / len(y)
    assert acc == pytest.approx(m["test_accuracy"], abs=1e-9)
    zero_blocks = int((W.reshape(5, 2, 392, 2).abs().amax(dim=(1, 3)) == 0).sum())  # independent of functional
    assert zero_blocks == m["zero_blocks"] and m["block_sparsity"] == zero_blocks / 1960
    assert m["weight_sparsity"] == int((W == 0).sum()) / W.numel()
    assert m["train_params"] == 7850 and m["train_macs"] == 7840  # dense training cost
    assert acc > 0.6
    if method == "iterative-pruning":
        assert abs(int((W == 0).sum()) - 0.5 * W.numel()) <= 1
    elif method == "dense":
        assert zero_blocks == 0
    else:
        assert abs(zero_blocks - 0.5 * 1960) <= 1


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid methods: ") as err:
        get_method("lasso")
    for name in BASELINES + ["dense", "kron"]:
        assert name in str(err.value) and name in METHODS


@pytest.mark.parametrize("method", ["rigl", "iterative-pruning", "block-magnitude"])
def test_methods_that_need_a_target_say_so(method):
    with pytest.raises(ValueError, match=f"method '{method}' needs a target sparsity"):
        get_method(method)(options(method), 100)


@pytest.mark.parametrize("method", ["group-lasso", "elastic-group-lasso"])
def test_proximal_methods_need_a_target_or_a_lambda(method):
    with pytest.raises(ValueError, match="needs a target sparsity or a lambda"):
        get_method(method)(options(method), 100)
    get_method(method)(options(method, lam=0.01), 100)


@pytest.mark.parametrize("method", BASELINES)
def test_bad_block_or_target_fails_before_training(method):
    with pytest.raises(ValueError, match=r"does not tile"):
        Run(TrainConfig(method=method, block_shape=(3, 3), target_sparsity=0.5), synthetic(), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"target sparsity must be in \[0, 1\)"):
        TrainConfig(method=method, target_sparsity=1.0)

"""Pattern selection: the layer against a dense twin, the prox, planted block shapes recovered, removed
candidates gone from model and optimizer, the collapse exact, resume, and the command line's files."""

import copy
import json

import pytest
import torch
from torch import nn

from kronsparse.cli import main
from kronsparse.functional import kron_weight
from kronsparse.layers import KronLinear, KronSelectLinear
from kronsparse.methods import get_method
from kronsparse.methods.select import SelectMethod, sparse_group_prox
from kronsparse.sparsifier import Sparsifier
from kronsparse.training.config import TrainConfig
from kronsparse.training.data import Dataset
from kronsparse.training.train import Run


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add contention on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def dense_twin(layer: KronSelectLinear) -> torch.Tensor:
    """W = sum_k sum_i torch.kron(S_k * A_k[i], B_k[i]), the naive way."""
    return sum(torch.kron(t.S * t.A[i], t.B[i]) for t in layer.terms.values() for i in range(t.rank))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_the_dense_twin(dtype, bias):
    torch.manual_seed(0)
    layer = KronSelectLinear(32, 8, [(2, 2), (4, 8), (1, 32)], rank=2, bias=bias, dtype=dtype)
    x = torch.randn(5, 3, 32, dtype=dtype, requires_grad=True)
    y = layer(x)
    twin = x @ dense_twin(layer).t() + (layer.bias if bias else 0)
    torch.testing.assert_close(y, twin)
    torch.testing.assert_close(layer.dense_weight(), dense_twin(layer))
    params = [x, *layer.parameters()]
    g1 = torch.autograd.grad(y.square().sum(), params)
    g2 = torch.autograd.grad(twin.square().sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_a_candidate_that_does_not_tile_is_an_error_listing_the_valid_sides():
    with pytest.raises(ValueError, match=r"candidate block shape \(2, 16\) does not fit layer 100 -> 10.*"
                                         r"bi must divide in \(\[1, 2, 4, 5, 10, 20, 25, 50, 100\]\)"):
        KronSelectLinear(100, 10, [(2, 2), (2, 16)])
    with pytest.raises(ValueError, match="needs --candidates"):  # the CLI's config
        Run(TrainConfig(method="select"), tiny_dataset(), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs candidate block shapes"):  # the Sparsifier's options
        SelectMethod.Options(candidates=())


def test_sparse_group_prox_soft_thresholds_then_shrinks_the_whole_group():
    S = [torch.tensor([[3.0, -0.5]]), torch.tensor([1.5, 0.25])]
    # l1 by 0.5: [2.5, 0, 1.0, 0], norm sqrt(7.25); group shrink by norm/2 halves it
    out = sparse_group_prox(S, 0.5, 7.25 ** 0.5 / 2)
    torch.testing.assert_close(out[0], torch.tensor([[1.25, 0.0]]))
    torch.testing.assert_close(out[1], torch.tensor([0.5, 0.0]))
    assert all(not o.any() for o in sparse_group_prox(S, 0.5, 7.25 ** 0.5))  # exactly zero at the norm


def test_collapse_gives_a_kronlinear_holding_the_surviving_term():
    torch.manual_seed(0)
    layer = KronSelectLinear(64, 8, [(2, 2), (2, 8), (2, 16)], rank=2)
    term = layer.terms["2x8"]
    W, params = term.dense_weight().detach().clone(), [term.S, term.A, term.B, layer.bias]
    layer.remove("2x2")
    layer.remove("2x16")
    x = torch.randn(4, 64)
    y = layer(x)
    kron = layer.collapse("2x8")
    assert type(kron) is KronLinear and kron.block_shape == (2, 8) and kron.rank == 2
    assert torch.equal(kron.dense_weight(), W)
    assert all(a is b for a, b in zip(kron.parameters(), params))  # the same objects: optimizer state survives
    torch.testing.assert_close(kron(x), y)


def planted_fit(planted_shape, steps=1000, seed=0):
    """Regress onto a rank-2 teacher whose (planted_shape) blocks are half zero; return the method."""
    g = torch.Generator().manual_seed(seed)
    (bo, bi), out, inp = planted_shape, 8, 64
    mask = (torch.rand(out // bo, inp // bi, generator=g) < 0.5).float()
    teacher = kron_weight(mask, torch.randn(2, out // bo, inp // bi, generator=g), torch.randn(2, bo, bi, generator=g))
    teacher = 3 * teacher / teacher.std() / inp ** 0.5
    x = torch.randn(256, inp, generator=g)
    y = x @ teacher.t()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inp, out))
    sp = Sparsifier(model, "select", candidates=[(2, 2), (2, 8), (2, 16)], rank=2, total_steps=steps)
    opt = sp.optimizer(torch.optim.SGD, lr=0.02, momentum=0.9)
    for step in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step(opt)  # removes the parameters of dropped candidates from opt itself
    return sp.method, model, (model(x) - y).square().mean().item()


@pytest.mark.parametrize("planted", [(2, 8), (2, 2), (2, 16)])
def test_selection_recovers_the_planted_block_shape(planted):
    method, model, loss = planted_fit(planted)
    assert method.selected is not None and method.block_shape == planted
    assert type(model[0]) is KronLinear and model[0].block_shape == planted
    assert loss < 1e-2  # and the survivor fits the teacher


def tiny_dataset(n=512, features=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(classes, features, generator=g)
    x = torch.randn(n, features, generator=g)
    y = (x @ teacher.t()).argmax(1)
    return Dataset("planted", x[: n // 2], y[: n // 2], x[n // 2:], y[n // 2:], classes)


def select_cfg(**kw):
    base = dict(method="select", candidates=[(2, 2), (2, 4), (2, 16)], rank=2, epochs=4, batch_size=16,
                target_sparsity=0.5, lr=0.05)
    return TrainConfig(**{**base, **kw})


def test_removed_candidates_leave_no_parameters_in_model_or_optimizer():
    run = Run(select_cfg(), tiny_dataset(), torch.device("cpu"))
    first = {name: list(term.parameters()) for name, term in run.model.layers[0].terms.items()}
    removed_seen = 0
    for step in range(run.total_steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(run.ds.x_train)
        run.train_step(run.ds.x_train[idx], run.ds.y_train[idx])
        model_params = {id(p) for p in run.model.parameters()}
        opt_params = [p for g in run.optimizer.param_groups for p in g["params"]]
        assert {id(p) for p in opt_params} == model_params and len(opt_params) == len(model_params)
        assert {id(p) for p in run.optimizer.state} <= model_params
        gone = [p for n in run.method.removed_at for p in first[n]]
        assert not any(id(p) in model_params for p in gone)
        removed_seen = max(removed_seen, len(run.method.removed_at))
    assert removed_seen == 2 and run.method.selected is not None
    survivor = run.model.layers[0]
    assert type(survivor) is KronLinear and run.method.layers == [survivor]
    assert all(any(p is q for q in first[run.method.selected]) for p in (survivor.S, survivor.A, survivor.B))
    zero = (survivor.S == 0).float().mean().item()
    assert zero == pytest.approx(0.5, abs=1 / survivor.S.numel())  # the kron method's target, reached


def test_state_dict_round_trip_after_removals_and_collapse():
    cfg = select_cfg()
    run = Run(cfg, tiny_dataset(), torch.device("cpu"))
    for _ in range(3):
        run.train_epoch(progress=False)
    assert run.method.selected is not None
    fresh = Run(cfg, tiny_dataset(), torch.device("cpu"))
    fresh.load_state_dict(copy.deepcopy(run.state_dict()))  # as a checkpoint file would: no shared buffers
    assert type(fresh.model.layers[0]) is KronLinear and fresh.method.block_shape == run.method.block_shape
    for a, b in zip(fresh.model.state_dict().values(), run.model.state_dict().values()):
        assert torch.equal(a, b)
    r1, r2 = run.train_epoch(progress=False), fresh.train_epoch(progress=False)
    assert r1["train_loss"] == r2["train_loss"]
    assert run.method.summary()["group_norms"] == fresh.method.summary()["group_norms"]


def test_cli_writes_the_selected_shape_group_norms_and_the_plot(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--method", "select", "--candidates", "2x2,2x16", "--rank", "2", "--target-sparsity", "0.5",
            "--n-train", "1024", "--n-test", "256", "--epochs", "3", "--threads", "1", "--no-progress",
            "--out", str(out)]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "select" and get_method("select") is SelectMethod
    assert metrics["block_shape"] == metrics["selected_block_shape"] in ([2, 2], [2, 16])
    assert set(metrics["group_norms"]) == {"2x2", "2x16"} and all(len(v) == 3 for v in metrics["group_norms"].values())
    assert metrics["selection_rule"] and metrics["group_norms_plot"] == "group_norms.png"
    assert (out / "group_norms.png").stat().st_size > 0
    assert metrics["block_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert metrics["train_params"] < metrics["selection_train_params"]

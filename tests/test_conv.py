"""KronConv2d against a torch.kron dense twin, and LeNet-5 trained by the kron and dense methods
(the baselines on conv layers: test_methods_conv.py)."""

import json

import pytest
import torch
import torch.nn.functional as nnf
from safetensors.torch import load_file
from torch import nn

from kronsparse.functional import block_mask_of
from kronsparse.layers import KronConv2d, matrix_view
from kronsparse.training.config import TrainConfig
from kronsparse.training.models import LeNet5, build_model, dense_factory, kron_factory
from kronsparse.training.train import train


def twin_weight(S, A, B):
    """W[p*bo+a, q*bi+c, y, x] = sum_i S[p,q] A[i,p,q] B[i,a,c,y,x], built with torch.kron."""
    return sum(torch.kron((S * A[i])[:, :, None, None], B[i]) for i in range(A.shape[0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("block,rank,bias,stride,padding", [
    ((2, 3), 2, True, 1, 1),    # rectangular
    ((1, 1), 1, False, 2, 0),   # 1x1 blocks, strided
    ((4, 6), 3, True, 1, 2),    # the whole channel matrix
    ((4, 2), 2, True, (2, 1), (1, 0)),
])
def test_forward_and_grads_match_the_dense_twin(dtype, block, rank, bias, stride, padding):
    torch.manual_seed(0)
    layer = KronConv2d(6, 4, (3, 2), block, rank, stride=stride, padding=padding, bias=bias).to(dtype)
    x = torch.randn(3, 6, 9, 8, dtype=dtype, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    S, A, B = (p.detach().clone().requires_grad_() for p in (layer.S, layer.A, layer.B))
    b = layer.bias.detach().clone().requires_grad_() if bias else None
    x2 = x.detach().clone().requires_grad_()
    y2 = nnf.conv2d(x2, twin_weight(S, A, B), b, stride, padding)
    (y2 * gy).sum().backward()
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y, y2, **tol)
    torch.testing.assert_close(layer.dense_weight(), twin_weight(S, A, B), **tol)
    for got, want in [(layer.S.grad, S.grad), (layer.A.grad, A.grad), (layer.B.grad, B.grad), (x.grad, x2.grad)]:
        torch.testing.assert_close(got, want, **tol)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad, **tol)


def test_shapes_mask_and_repr():
    layer = KronConv2d(6, 16, 5, (2, 3), rank=2)
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "S": (8, 2), "A": (2, 8, 2), "B": (2, 2, 3, 5, 5), "bias": (16,)}
    assert layer.dense_weight().shape == (16, 6, 5, 5)
    with torch.no_grad():
        layer.S[3, 1] = 0
    mask = layer.block_mask()
    assert mask.shape == (8, 2) and mask.sum() == 15 and not mask[3, 1]
    assert not layer.dense_weight()[6:8, 3:6].any()
    assert "block_shape=(2, 3), rank=2" in repr(layer)
    with pytest.raises(ValueError, match="does not tile"):
        KronConv2d(6, 16, 5, (3, 2))


def test_init_variance_matches_nn_conv2d():
    torch.manual_seed(0)
    kron = torch.stack([KronConv2d(16, 32, 3, (2, 2), 2).dense_weight().var() for _ in range(20)]).mean()
    assert kron.item() == pytest.approx(nn.Conv2d(16, 32, 3).weight.var().item(), rel=0.15)


def test_from_conv2d_is_exact_at_full_rank_and_to_conv2d_round_trips():
    src = KronConv2d(4, 6, 3, (3, 2), rank=2, padding=1).double()
    conv = src.to_conv2d()
    assert type(conv) is nn.Conv2d
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(conv(x), src(x))
    back = KronConv2d.from_conv2d(conv, (3, 2), rank=2)
    torch.testing.assert_close(back.dense_weight(), src.dense_weight())


def test_lenet5_shapes_and_factories():
    model = build_model("lenet5", kron_factory((2, 2), 2))
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds == ["Conv2d", "KronConv2d", "KronLinear", "KronLinear", "KronLinear"]  # 1 input channel: dense
    assert model(torch.randn(3, 784)).shape == (3, 10)
    dense = build_model("lenet5", dense_factory)
    assert sum(p.numel() for p in dense.parameters()) == 61706
    with pytest.raises(ValueError, match="square images"):
        build_model("lenet5", dense_factory, num_features=780)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


QUICK = dict(model="lenet5", n_train=3000, n_test=500, epochs=2, standardize=True, optimizer="adam", lr=0.003,
             threads=1)  # one thread: 2-thread kernels crawl when the 2 cores are shared


def test_lenet5_trains_with_kron_and_metrics_read_the_final_dense_weights(tmp_path):
    cfg = TrainConfig(method="kron", block_shape=(2, 2), rank=2, target_sparsity=0.5, **QUICK)
    metrics = train(cfg, out=tmp_path, progress=False)
    assert metrics["sparsified_layers"] == [1, 2, 3, 4]
    assert metrics["train_paths"][:2] == ["dense", "materialize"]
    t = load_file(str(tmp_path / "model.safetensors"))
    assert t["layers.1.weight"].shape == (16, 6, 5, 5) and t["layers.1.kron.B"].shape == (2, 2, 2, 5, 5)
    zero = total = 0
    for k in metrics["sparsified_layers"]:
        mask = block_mask_of(*matrix_view(t[f"layers.{k}.weight"], (2, 2)))
        zero, total = zero + int((~mask).sum()), total + mask.numel()
    assert (zero, total) == (metrics["zero_blocks"], metrics["num_blocks"])
    assert metrics["block_sparsity"] == pytest.approx(0.5, abs=0.01)
    conv = t["layers.1.weight"]  # channel blocks of the conv are zero over the whole 5x5 window
    blocks = conv.reshape(8, 2, 3, 2, 25).transpose(1, 2).ne(0).flatten(2).any(-1)
    assert torch.equal(blocks, block_mask_of(conv.flatten(1), (2, 50)))
    assert json.loads((tmp_path / "metrics.json").read_text())["test_accuracy"] > 0.6


def test_lenet5_dense_baseline_trains_and_select_refuses_conv_clearly(tmp_path):
    metrics = train(TrainConfig(method="dense", **QUICK), out=tmp_path, progress=False)
    assert metrics["block_sparsity"] == 0.0 and metrics["test_accuracy"] > 0.6
    assert metrics["train_params"] == 61706
    with pytest.raises(ValueError, match="needs a method that makes conv layers"):
        train(TrainConfig(method="select", candidates=((2, 2), (2, 8)), target_sparsity=0.5, **QUICK), progress=False)
    assert isinstance(build_model("lenet5", dense_factory), LeNet5)

"""The baselines on conv layers: a conv weight (out, in, kh, kw) in (bo, bi) channel blocks is the
matrix (out, in*kh*kw) in (bo, bi*kh*kw) blocks, so every zero block spans the whole kernel. Exact
masks on hand-made weights, then short LeNet-5 runs on real MNIST checked from the saved weights."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kronsparse.methods import get_method
from kronsparse.methods.block_magnitude import BlockMagnitudeMethod
from kronsparse.methods.group_lasso import GroupLassoMethod
from kronsparse.methods.rigl import RigLMethod
from kronsparse.training.config import TrainConfig
from kronsparse.training.models import FeedForward
from kronsparse.training.train import train

BASELINES = ["group-lasso", "elastic-group-lasso", "rigl", "iterative-pruning", "block-magnitude"]


@pytest.fixture(autouse=True)
def _keep_thread_count():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def channel_blocks(W, block_shape):
    """Bool (out/bo, in/bi): True where channel block (p, q) of W, over its whole kernel, is non-zero.
    Built by reshaping, independent of matrix_view and functional."""
    bo, bi = block_shape
    out, inp = W.shape[:2]
    return W.reshape(out // bo, bo, inp // bi, bi, -1).transpose(1, 2).ne(0).flatten(2).any(-1)


def expand_channels(mask, block_shape, kernel=(3, 3)):
    """Channel block mask (m1, n1) -> element mask (m1*bo, n1*bi, kh, kw)."""
    bo, bi = block_shape
    return mask.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:, :, None, None].expand(-1, -1, *kernel)


def conv_prepared(method_cls, cfg, values, total_steps=10):
    """A method prepared on one Conv2d(4, 4, 3) whose channel block (p, q) (2x2 channels, 3x3 kernel,
    36 weights) is the constant values[p][q]."""
    model = FeedForward([nn.Conv2d(4, 4, 3)])
    method = method_cls(cfg, total_steps)
    method.prepare(model)
    weight = model.layers[0].weight if method_cls is not BlockMagnitudeMethod else \
        model.layers[0].parametrizations.weight.original
    with torch.no_grad():
        weight.copy_(expand_channels(torch.tensor(values), (2, 2)))
    return method, model


def test_group_lasso_prox_on_a_conv_zeroes_whole_channel_blocks():
    cfg = get_method("group-lasso").Options(block_shape=(2, 2), lam=1.0)
    method, model = conv_prepared(GroupLassoMethod, cfg, [[0.25, 1.0], [-0.5, 2.0]])
    # block norms 6|v|; group threshold t * sqrt(36) = 6t, t = lr * lam = 0.5: |v| <= 0.5 goes
    method.step(None, 0, 0.5)
    W = model.layers[0].weight
    torch.testing.assert_close(W, expand_channels(torch.tensor([[0.0, 0.5], [0.0, 1.5]]), (2, 2)))
    assert method.num_blocks == 4


def test_group_lasso_top_up_on_a_conv_prunes_the_smallest_channel_blocks():
    cfg = get_method("group-lasso").Options(block_shape=(2, 2), target_sparsity=0.75)
    method, model = conv_prepared(GroupLassoMethod, cfg, [[0.3, 1.0], [-0.2, 2.0]])
    with torch.no_grad():
        method.finalize()
    assert method.topped_up == 3
    assert torch.equal(model.layers[0].weight != 0, expand_channels(torch.tensor([[False, False], [False, True]]),
                                                                    (2, 2)))


def test_block_magnitude_on_a_conv_zeroes_the_smallest_channel_blocks():
    cfg = get_method("block-magnitude").Options(block_shape=(2, 2), target_sparsity=0.5, sparsify_fraction=1.0)
    method, model = conv_prepared(BlockMagnitudeMethod, cfg, [[3.0, 1.0], [-4.0, 2.0]], total_steps=1)
    method.step(None, 0, 0.1)  # the last sparsifying step: level = target
    method.finalize()  # squash
    W = model.layers[0].weight
    assert isinstance(W, nn.Parameter) and W.shape == (4, 4, 3, 3)
    assert torch.equal(W != 0, expand_channels(torch.tensor([[True, False], [True, False]]), (2, 2)))


def test_rigl_masks_a_conv_by_whole_channel_blocks():
    cfg = get_method("rigl").Options(block_shape=(2, 2), target_sparsity=0.5)
    method, model = conv_prepared(RigLMethod, cfg, [[1.0, 1.0], [1.0, 1.0]])
    with torch.no_grad():
        method._apply_masks()
    mask = method.masks[0]
    assert mask.shape == (2, 2) and int(mask.sum()) == 2
    assert torch.equal(model.layers[0].weight != 0, expand_channels(mask, (2, 2)))
    method.grads = [expand_channels(torch.tensor([[5.0, 6.0], [7.0, 8.0]]), (2, 2))]  # an update step's gradient
    optimizer = torch.optim.Adam(model.parameters())
    method.update_masks(optimizer, 0.5)  # drops one active block, grows the inactive one of largest score
    assert int(method.masks[0].sum()) == 2 and not torch.equal(method.masks[0], mask)
    with torch.no_grad():
        method._apply_masks()
    assert torch.equal(model.layers[0].weight != 0, expand_channels(method.masks[0] & mask, (2, 2)))


@pytest.mark.parametrize("method", BASELINES)
def test_lenet5_trains_with_its_conv_on_the_block_grid(method, tmp_path):
    cfg = TrainConfig(method=method, model="lenet5", block_shape=(2, 2), target_sparsity=0.5, n_train=1000,
                      n_test=200, epochs=1, standardize=True, optimizer="adam", lr=0.003, threads=1)
    metrics = train(cfg, out=tmp_path, progress=False)
    assert metrics["sparsified_layers"] == [1, 2, 3, 4]  # conv 1 -> 6 has one input channel: off the grid
    assert json.loads((tmp_path / "metrics.json").read_text())["block_sparsity"] == metrics["block_sparsity"]
    t = load_file(str(tmp_path / "model.safetensors"))
    masks = [channel_blocks(t[f"layers.{k}.weight"], (2, 2)) for k in metrics["sparsified_layers"]]
    zero, total = sum(int((~m).sum()) for m in masks), sum(m.numel() for m in masks)
    assert (zero, total) == (metrics["zero_blocks"], metrics["num_blocks"])
    assert metrics["block_sparsity"] == zero / total
    conv = t["layers.1.weight"]
    assert conv.shape == (16, 6, 5, 5)
    if method == "iterative-pruning":  # unstructured: the target is a fraction of weights, conv included
        weights = sum(t[f"layers.{k}.weight"].numel() for k in metrics["sparsified_layers"])
        assert abs(metrics["weight_sparsity"] * weights - 0.5 * weights) <= 1
        assert int((conv == 0).sum()) > 0
        return
    assert torch.equal(conv != 0, expand_channels(masks[0], (2, 2), (5, 5)))  # zeros are whole channel blocks
    assert abs(zero - 0.5 * total) <= 1
    if method in ("rigl", "block-magnitude"):  # the same fraction in every layer: 12 of the conv's 24 blocks
        assert int((~masks[0]).sum()) == 12

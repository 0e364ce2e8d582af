"""The inference layers against plain PyTorch, each representation forced in turn.

`auto` picks by timing, so a test that only runs `auto` may never run the BSR path: every test here
names the representation it runs. Bugs these catch (each seen failing in a scratch copy,
`python tools/mutate.py`): a BSR path that drops the bias, a BlockSparseConv2d that ignores its
stride, a `replace_layers_` that loads the weight layers and skips every other tensor (norms).
"""

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn

from kronsparse import KronConv2d, KronLinear
from kronsparse.export import export_model
from kronsparse.inference import BlockSparseConv2d, BlockSparseLinear, load_layers, replace_layers_

pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")

REPRESENTATIONS = ("dense", "bsr")


def block_sparse(shape, block, generator, keep=0.5):
    """A random weight of `shape` (out, in[, kh, kw]) with about half of its (bo, bi) channel blocks zero."""
    W = torch.randn(*shape, generator=generator)
    bo, bi = block
    mask = torch.rand(shape[0] // bo, shape[1] // bi, generator=generator) < keep
    mask[0, 0] = True
    mask = mask.repeat_interleave(bo, 0).repeat_interleave(bi, 1)
    return W * mask.view(*mask.shape, *([1] * (len(shape) - 2)))


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("block", [(2, 2), (2, 8)])  # square blocks: torch's BSR kernel; others: ours
def test_linear_equals_nn_linear_with_its_bias(representation, block):
    g = torch.Generator().manual_seed(0)
    W, b = block_sparse((6, 16), block, g), torch.randn(6, generator=g) * 3
    layer = BlockSparseLinear(W, b, block, representation=representation)
    assert "bsr" in layer.candidates()
    for x in (torch.randn(5, 16, generator=g), torch.randn(2, 3, 16, generator=g)):
        torch.testing.assert_close(layer(x), nnf.linear(x, W, b))


@pytest.mark.parametrize("representation", REPRESENTATIONS)
@pytest.mark.parametrize("stride,padding", [(2, 0), (2, 1), ((2, 1), (0, 2)), ((1, 3), 1), (1, 0)])
def test_conv_equals_nn_conv2d_with_its_stride_and_padding(representation, stride, padding):
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(4, 6, (3, 2), stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(block_sparse((6, 4, 3, 2), (2, 2), g))
        conv.bias.copy_(torch.randn(6, generator=g))
    layer = BlockSparseConv2d(conv.weight, conv.bias, (2, 2), conv.stride, conv.padding, representation)
    x = torch.randn(3, 4, 11, 9, generator=g)
    want = conv(x)
    got = layer(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("representation", ("auto", *REPRESENTATIONS))
def test_a_strided_kron_conv_exports_and_loads_back_with_its_stride(tmp_path, representation):
    torch.manual_seed(2)
    model = nn.Sequential(KronConv2d(4, 6, 3, (2, 2), rank=2, stride=2, padding=1), nn.ReLU())
    with torch.no_grad():
        model[0].S[0] = 0
    x = torch.randn(2, 4, 10, 10)
    for fmt in ("dense", "bsr", "factors"):
        path = export_model(model, tmp_path / f"conv.{fmt}.safetensors", fmt)
        layer = load_layers(path, representation)["0"]
        assert isinstance(layer, BlockSparseConv2d)
        torch.testing.assert_close(layer(x), model[0](x), rtol=1e-4, atol=1e-5)


def swapped_model_with_norms():
    """A swapped model with some blocks zero, a LayerNorm and a BatchNorm1d whose parameters and
    running statistics are far from their defaults (so skipping them cannot go unnoticed)."""
    torch.manual_seed(3)  # built from KronLinear directly, not by swap_linear_ (being reworked)
    model = nn.Sequential(KronLinear(16, 32, (4, 4), rank=2), nn.BatchNorm1d(32), nn.ReLU(),
                          KronLinear(32, 8, (4, 4), rank=2), nn.LayerNorm(8))
    with torch.no_grad():
        model[0].S[:3] = 0
        model[3].S[0] = 0
        for norm in (model[1], model[4]):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].num_batches_tracked.fill_(7)
    return model.eval()


def plain_twin():
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8)).eval()


@pytest.mark.parametrize("fmt", ["dense", "bsr", "factors"])
@pytest.mark.parametrize("representation", ("auto", *REPRESENTATIONS))
def test_replace_layers_loads_every_other_tensor_norms_included(tmp_path, fmt, representation):
    model = swapped_model_with_norms()
    x = torch.randn(5, 16)
    path = export_model(model, tmp_path / f"m.{fmt}.safetensors", fmt)
    target = replace_layers_(plain_twin(), path, representation)
    assert isinstance(target[0], BlockSparseLinear) and isinstance(target[3], BlockSparseLinear)
    for k in (1, 4):  # the norms now hold the exported values, not their defaults
        for name, t in model[k].state_dict().items():
            assert torch.equal(target[k].state_dict()[name], t), f"{k}.{name}"
    torch.testing.assert_close(target(x), model(x), rtol=1e-5, atol=1e-5)


def test_the_bsr_path_of_replace_layers_keeps_the_bias(tmp_path):
    """The README's "Use it on your model" flow with the BSR representation forced (auto may pick dense)."""
    torch.manual_seed(4)
    model = nn.Sequential(KronLinear(64, 128, (4, 4), rank=2), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        model[0].S[::2] = 0
        model[0].bias.normal_(0, 2)
    x = torch.randn(32, 64)
    plain = replace_layers_(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)),
                            export_model(model, tmp_path / "m.bsr.safetensors", "bsr"), "bsr")
    assert plain[0].representation == "bsr" and plain[0].bsr is not None
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)

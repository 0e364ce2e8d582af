"""KronLinear: a drop-in nn.Linear whose weight is a Kronecker sum."""

import pytest
import torch
from torch import nn

from kronsparse import KronLinear, swap_linear_


def test_parameters_and_repr():
    layer = KronLinear(784, 10, (2, 16), rank=2)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"S": (5, 49), "A": (2, 5, 49), "B": (2, 2, 16), "bias": (10,)}
    assert sum(p.numel() for p in layer.parameters()) == 809  # 2*(245 + 32) + 245 + 10: r*(m1*n1 + bo*bi) + m1*n1 + bias
    assert "block_shape=(2, 16), rank=2, bias=True" in repr(layer)
    assert KronLinear(8, 4, (2, 2), bias=False).bias is None


@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_forward_equals_its_dense_weight(lead):
    layer = KronLinear(12, 8, (2, 3), rank=3).double()
    x = torch.randn(*lead, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.dense_weight(), layer.bias))


def test_init_matches_nn_linear_output_variance():
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    kron = torch.stack([KronLinear(256, 64, (4, 4), rank=2, bias=False)(x).var() for _ in range(40)])
    dense = torch.stack([nn.Linear(256, 64, bias=False)(x).var() for _ in range(40)])
    assert kron.mean().item() == pytest.approx(dense.mean().item(), rel=0.1)


def test_block_mask_follows_S():
    layer = KronLinear(12, 8, (2, 3), rank=2)
    with torch.no_grad():
        layer.S[1, 2] = 0.0
    mask = layer.block_mask()
    assert mask.shape == (4, 4) and mask.sum() == 15 and not mask[1, 2]
    assert not layer.dense_weight()[2:4, 6:9].any()


@pytest.mark.parametrize("kwargs,match", [
    ({"block_shape": (3, 2)}, "does not tile"),
    ({"block_shape": (2, 2), "rank": 0}, "rank must be >= 1"),
    ({"block_shape": (2, 2), "path": "gpu"}, "unknown path"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KronLinear(8, 4, **kwargs)


def test_from_linear_is_exact_for_a_kronecker_sum_and_to_linear_round_trips():
    src = KronLinear(12, 8, (2, 3), rank=2).double()
    linear = src.to_linear()
    assert type(linear) is nn.Linear
    torch.testing.assert_close(linear.weight, src.dense_weight())
    back = KronLinear.from_linear(linear, (2, 3), rank=2)
    torch.testing.assert_close(back.dense_weight(), src.dense_weight())
    torch.testing.assert_close(back.bias, src.bias)


def test_swap_linear_reports_what_it_skipped():
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    x = torch.randn(4, 16)
    report = swap_linear_(model, (2, 4), rank=8)  # rank 8 = full rank for (8, 16) in (2, 4) blocks
    assert report.swapped == ["0"] and "does not tile" in report.skipped["2"]
    assert isinstance(model[0], KronLinear) and type(model[2]) is nn.Linear
    assert model(x).shape == (4, 3)

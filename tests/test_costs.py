"""Cost counts against numbers computed by hand."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kronsparse import KronLinear, choose_path, layer_costs, plan_block_shapes
from kronsparse.costs import path_macs


def test_paper_mnist_layer_by_hand():
    c = layer_costs(784, 10, (2, 16), rank=2)
    # m1 = 5, n1 = 49: 2*(245 + 32) + 245 + 10
    assert c.train_params == 809
    assert c.dense_params == 7850 and c.dense_macs == 7840 and c.dense_paper_flops == 7850
    assert c.macs.input_first == 2 * (49 * 16 * 2 + 5 * 49 * 2)  # 4116
    assert c.macs.factors_first == 2 * (5 * 49 * 16 + 5 * 16 * 2)  # 8160
    assert c.macs.materialize == 7840 and c.macs.materialize_build == 2 * 7840
    assert c.paper_flops == 4116 + 10
    assert c.train_state_bytes == 809 * 4 * 4 and c.dense_train_state_bytes == 7850 * 16


def test_two_by_two_layer_by_hand():
    c = layer_costs(784, 10, (2, 2), rank=2, bias=False)
    assert c.train_params == 2 * (5 * 392 + 4) + 5 * 392  # 5888
    assert c.macs.factors_first == 2 * (5 * 392 * 2 + 5 * 2 * 2)


@pytest.mark.parametrize("path", ["input_first", "factors_first"])
def test_macs_agree_with_torch_flop_counter(path):
    """flop_counter counts 2 FLOPs per multiply-add of the matmuls that run."""
    layer = KronLinear(96, 64, (4, 8), rank=3, bias=False, path=path)
    x = torch.randn(5, 96)
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == 2 * 5 * getattr(path_macs(96, 64, (4, 8), 3), path)


def test_choose_path_prefers_dense_for_tiny_layers_and_factors_for_big_blocks():
    assert choose_path(784, 10, (2, 2), 2, batch=64) == "materialize"
    assert choose_path(2048, 2048, (16, 16), 2, batch=512) in ("input_first", "factors_first")


def test_planner_marks_the_fewest_params():
    rows = plan_block_shapes(784, 10, rank=2)
    assert len(rows) == 4 * 15  # divisors of 10 times divisors of 784
    best = [r for r in rows if r.best]
    assert all(r.train_params == min(x.train_params for x in rows) for r in best)
    row = next(r for r in rows if r.block_shape == (2, 16))
    assert row.paper_name == "16x2" and row.train_params == 809

"""swap_linear_ and its way back: no custom module left, the same outputs."""

import copy

import pytest
import torch
from torch import nn

from kronsparse import KronLinear, swap_linear_
from kronsparse.layers import KRON_LAYERS, kron_dense


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
        self.head = nn.Linear(8, 3)  # (2, 4) does not tile 3 outputs
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.head(self.norm(self.encoder(x)))


def swap_back_(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, KRON_LAYERS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, kron_dense(module))


def test_swap_then_swap_back_leaves_no_custom_module_and_the_same_outputs():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    report = swap_linear_(model, (2, 4), rank=8)  # full rank: the swap is exact
    assert report.swapped == ["encoder.0", "encoder.2"] and "does not tile" in report.skipped["head"]
    assert isinstance(model.encoder[0], KronLinear)
    swapped_out = model(x)
    with torch.no_grad():
        model.encoder[0].S[0, 0] = 0  # a pruned block must survive the way back
    pruned_out = model(x)
    swap_back_(model)
    assert {type(m).__module__.split(".")[0] for m in model.modules()} <= {"torch", __name__.split(".")[0]}
    assert not any(isinstance(m, KRON_LAYERS) for m in model.modules())
    torch.testing.assert_close(model(x), pruned_out)
    assert not model.encoder[0].weight[:2, :4].any()
    assert not torch.equal(swapped_out, pruned_out)


def test_swap_is_exact_at_full_rank_and_filter_fn_excludes():
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(5, 16, dtype=torch.float64)
    before = model(x)
    report = swap_linear_(model, (2, 4), rank=8, filter_fn=lambda name, m: name != "encoder.2")
    assert report.swapped == ["encoder.0"] and report.skipped["encoder.2"] == "excluded by filter_fn"
    torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("block_shape", [(4, 4), (8, 8)])
def test_fresh_init_keeps_the_dense_weight_variance_where_svd_of_a_random_weight_loses_it(block_shape):
    """A transformer's Linear starts at std 0.02; its SVD conversion keeps only part of that (the
    nearest rank-r Kronecker sum of noise), the fresh init keeps all of it and the bias."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(256, 256))
    nn.init.normal_(dense[0].weight, std=0.02)
    fresh, svd = copy.deepcopy(dense), copy.deepcopy(dense)
    swap_linear_(fresh, block_shape, rank=4, init="fresh")
    swap_linear_(svd, block_shape, rank=4, init="svd")
    std_fresh = fresh[0].dense_weight().std().item()
    std_svd = svd[0].dense_weight().std().item()
    assert std_fresh == pytest.approx(0.02, rel=0.05)
    assert std_svd < 0.6 * 0.02
    assert torch.equal(fresh[0].bias, dense[0].bias) and isinstance(fresh[0], KronLinear)
    with pytest.raises(ValueError, match="unknown init"):
        swap_linear_(copy.deepcopy(dense), block_shape, init="zeros")


def test_weight_layers_do_not_descend_into_a_weight_layer():
    """A KronSelectLinear's candidate terms are part of it, not layers of the model (the one-layer
    rule of the scale pin and the ViT's metrics count layers)."""
    from kronsparse.layers import KronSelectLinear
    from kronsparse.model_tree import weight_layers

    model = nn.Sequential(KronSelectLinear(16, 8, [(2, 2), (4, 4)], rank=1), nn.ReLU(), nn.Linear(8, 4))
    assert list(weight_layers(model)) == ["0", "2"]
    assert list(weight_layers(model[0])) == [""]

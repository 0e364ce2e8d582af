"""The compact ViT: its parameter count against the formula at DeiT-tiny's shape, its costs against
torch.utils.flop_counter, `kronsparse train --model vit` for every kind of method, and the
fashion-vit reproduction end to end on a few hundred images."""

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kronsparse.cli import main
from kronsparse.experiments import vit as vit_reproduce
from kronsparse.experiments.vit import DEIT_TINY_FULL_COUNT, deit_tiny
from kronsparse.layers import KronLinear
from kronsparse.training.config import TrainConfig
from kronsparse.training.metrics import training_costs
from kronsparse.training.models import build_model, dense_factory, kron_factory
from kronsparse.training.train import train


def kron_formula(i: int, o: int, block, r: int) -> int:
    """r*(m1*n1 + bo*bi) + m1*n1 + bias, written out here rather than taken from costs.py."""
    bo, bi = block
    m1n1 = (o // bo) * (i // bi)
    return r * (m1n1 + bo * bi) + m1n1 + o


def test_deit_tiny_trainable_parameters_match_the_formula():
    model = deit_tiny(kron_factory((4, 4), 4))
    d, mlp, tokens = 192, 768, 197
    per_block = (kron_formula(d, 3 * d, (4, 4), 4) + kron_formula(d, d, (4, 4), 4) + kron_formula(d, mlp, (4, 4), 4)
                 + kron_formula(mlp, d, (4, 4), 4) + 2 * 2 * d)  # qkv, proj, fc1, fc2, two LayerNorms
    dense_parts = (3 * 16 * 16 * d + d) + d + tokens * d + 2 * d  # patch embedding, cls token, positions, norm
    expected = 12 * per_block + dense_parts + kron_formula(d, 100, (4, 4), 4)  # 4x4 tiles the 100-way head
    assert expected == DEIT_TINY_FULL_COUNT == 1_884_116
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    kron = [m for m in model.modules() if isinstance(m, KronLinear)]
    assert len(kron) == 12 * 4 + 1 and isinstance(model.patch_embed, nn.Conv2d)
    dense = deit_tiny(dense_factory)
    assert sum(p.numel() for p in dense.parameters()) == 5_543_716  # DeiT-tiny with a 100-way head


@pytest.mark.parametrize("factory", [dense_factory, kron_factory((4, 4), 4), kron_factory((2, 2), 1)])
def test_forward_macs_equal_flop_counter(factory):
    """Our count (every layer, each Kronecker layer's path and build, the attention products) is
    what torch.utils.flop_counter measures on the same forward pass."""
    torch.manual_seed(0)
    model = build_model("vit", factory, 784, 10)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    batch = 32
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(batch, 784))
    assert training_costs(model, batch)["train_macs"] == pytest.approx(fc.get_total_flops() / 2 / batch, abs=1)


def tiny(method: str, tmp_path, **kw) -> dict:
    cfg = TrainConfig(method=method, model="vit", dataset="fashion-mnist", block_shape=kw.pop("block", (4, 4)),
                      rank=2, target_sparsity=None if method == "dense" else 0.5, optimizer="adamw", lr=1e-3,
                      batch_size=64, epochs=1, n_train=256, n_test=128, standardize=True, threads=1, **kw)
    return train(cfg, out=tmp_path / method, progress=False)


@pytest.mark.parametrize("method", ["kron", "rigl", "select"])
def test_train_vit_reaches_the_target_in_every_layer(method, tmp_path):
    extra = {"candidates": ((2, 2), (4, 4), (8, 8)), "block": (2, 2)} if method == "select" else {}
    m = tiny(method, tmp_path, **extra)
    assert m["block_sparsity"] == 0.5
    assert 0 not in m["sparsified_layers"]  # the patch embedding stays dense
    assert len(m["sparsified_layers"]) == 16  # qkv, proj, fc1, fc2 of 4 blocks; 4x4 does not tile the head
    if method != "rigl":  # the Kronecker factors train at 8x AdamW's lr
        assert m["factor_lr"] == 8.0


def test_reproduce_fashion_vit_writes_the_report(tmp_path, monkeypatch):
    full = vit_reproduce.plan([0], vit_reproduce.base_config(True, {}))
    assert len(full) == 10 and {s.cfg.method for s in full} == {"dense", "select", *vit_reproduce.METHODS}
    keep = {"dense-4x4-r4-dense-s0", "kron-4x4-r4-t0.5-s0", "select-2x2-r4-t0.5-s0", "kron-8x8-r4-t0.5-s0"}
    original = vit_reproduce.plan
    monkeypatch.setattr(vit_reproduce, "plan", lambda seeds, base: [s for s in original(seeds, base) if s.name in keep])
    out = tmp_path / "vit"
    assert main(["reproduce", "fashion-vit", "--out", str(out), "--quick", "--n-train", "192", "--n-test", "64",
                 "--epochs", "1", "--jobs", "2"]) == 0
    report = (out / "report.md").read_text()
    assert "Selection keeps the block shape that is best" in report and "within 1 block/layer" in report
    for name in ("table.md", "table.csv", "cost.png", "masks.png", "selection.png"):
        assert (out / name).stat().st_size > 0
    assert all(json.loads((out / "runs" / n / "metrics.json").read_text())["config"]["n_train"] == 192 for n in keep)
    assert all(json.loads((out / "memory" / f"{n}.json").read_text())["peak_memory_bytes"] > 0 for n in keep)


def test_reproduce_refuses_a_model_that_is_not_a_vit(tmp_path, capsys):
    assert main(["reproduce", "fashion-vit", "--out", str(tmp_path / "x"), "--model", "mlp"]) == 2
    assert main(["reproduce", "mnist-mlp", "--out", str(tmp_path / "y"), "--model", "vit"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_is_refused_cleanly_without_cuda(tmp_path, capsys):
    assert main(["reproduce", "fashion-vit", "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_vit_on_cuda(tmp_path):
    m = tiny("kron", tmp_path, device="cuda")
    assert m["block_sparsity"] == 0.5 and m["device"].startswith("cuda")


def test_the_sparsifier_swaps_the_vit_of_the_users_loop():
    """The user's path: our ViT built with nn.Linear, the Sparsifier swaps every tiled Linear."""
    from kronsparse import Sparsifier
    from kronsparse.training.vit import ViT

    torch.manual_seed(0)
    model = build_model("vit", dense_factory, 784, 10)
    sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=4, target_sparsity=0.5, total_steps=6,
                    layers=ViT.sparsify_filter)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3)
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    for _ in range(6):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step(opt)
    sp.finalize()
    assert len(sp.layers) == 16 and sp.block_sparsity() == 0.5
    assert isinstance(model.blocks[0].attn.qkv, KronLinear) and type(model.patch_embed) is nn.Conv2d


def test_a_select_vit_lists_each_layer_once_so_metrics_run_before_the_selection():
    """The full fashion-vit run evaluates after epoch 1, before select has chosen: the ViT's layers
    must be its weight layers (one per position), not also the candidate terms inside them."""
    from kronsparse.sparsifier import Sparsifier
    from kronsparse.training.models import build_model
    from kronsparse.training.train import layer_factory

    cfg = TrainConfig(method="select", model="vit", block_shape=(2, 2), candidates=((2, 2), (4, 4)), rank=2)
    model = build_model("vit", layer_factory(cfg), 784, 10)
    sp = Sparsifier(model, "select", block_shape=(2, 2), candidates=((2, 2), (4, 4)), target_sparsity=0.5,
                    total_steps=100, layers=model.sparsify_filter)
    assert sp.method.selected is None
    assert len(model.layers) == len(model.positions) == 1 + 16 + 1
    x = torch.randn(4, 784)
    assert model(x).shape == (4, 10)

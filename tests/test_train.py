"""End-to-end training on slices of the real MNIST: files, independent recomputation, determinism."""

import json

import pytest
import torch
from safetensors.torch import load_file

from kronsparse.cli import main
from kronsparse.functional import block_mask_of, kron_weight
from kronsparse.training import data
from kronsparse.training.config import TrainConfig
from kronsparse.training.train import train

# 47 steps on 3,000 images: learns to ~0.78-0.81 in under a second (chance is 0.10), so the accuracy bars
# below fail when the method stops learning, not only when a file is missing
QUICK = dict(n_train=3000, n_test=1000, epochs=1, standardize=True, lr=0.05)
# 188 steps on 6,000 images (2 epochs): 0.868 (linear, 2x2) and 0.903 (MLP, 2x2) at 60%, in 1-3 s
LEARN = dict(n_train=6000, n_test=1000, epochs=2, standardize=True, lr=0.05)


def recompute(out_dir, metrics):
    """Accuracy and block sparsity from model.safetensors alone, as an outsider would."""
    t = load_file(str(out_dir / "model.safetensors"))
    ds = data.subset(data.load_dataset("mnist", download=False), metrics["config"]["n_train"],
                     metrics["config"]["n_test"])
    x = (ds.x_test - metrics["input_mean"]) / metrics["input_std"]
    logits = x @ t["weight"].t() + t["bias"]
    acc = (logits.argmax(1) == ds.y_test).float().mean().item()
    mask = block_mask_of(t["weight"], metrics["block_shape"])
    return acc, 1 - mask.float().mean().item(), t


def test_one_epoch_writes_files_that_agree_with_the_json(tmp_path):
    cfg = TrainConfig(method="kron", block_shape=(2, 2), rank=2, target_sparsity=0.5, **QUICK)
    metrics = train(cfg, out=tmp_path, progress=False)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["test_accuracy"] == metrics["test_accuracy"]
    for key in ("method", "model", "dataset", "block_shape", "rank", "epochs", "seed", "test_accuracy",
                "block_sparsity", "weight_sparsity", "train_params", "train_macs", "inference_params",
                "inference_macs", "wall_seconds", "config", "input_mean", "input_std"):
        assert key in on_disk, key
    acc, block_sparsity, t = recompute(tmp_path, on_disk)
    assert acc == pytest.approx(on_disk["test_accuracy"], abs=1e-6)
    assert block_sparsity == pytest.approx(on_disk["block_sparsity"], abs=1e-9)
    assert on_disk["block_sparsity"] >= 0.5  # the target is reached exactly (ceil of blocks)
    # measured 0.813 with the legacy steering (2026-12-01), 0.674 with track (2026-12-07): in this
    # 47-step run with the "decay" pin every S starts at 1, and pruning along the ramp shrinks them all
    assert on_disk["test_accuracy"] >= 0.6
    assert on_disk["train_params"] == 5898 and on_disk["inference_params"] == int((t["weight"] != 0).sum()) + 10
    torch.testing.assert_close(kron_weight(t["kron.S"], t["kron.A"], t["kron.B"]), t["weight"])


def test_same_seed_same_metrics():
    cfg = TrainConfig(method="kron", block_shape=(2, 16), rank=2, target_sparsity=0.4, **QUICK)
    a, b = train(cfg, progress=False), train(cfg, progress=False)
    for key in ("test_accuracy", "block_sparsity", "weight_sparsity", "inference_params", "final_lambda"):
        assert a[key] == b[key], key
    # equal because both learned the same, not because neither did: measured 0.777 with the legacy
    # steering, 0.58 with track (47 steps, "decay" pin: see test_one_epoch_writes_files_that_agree_with_the_json)
    assert a["test_accuracy"] >= 0.5


def test_mlp_sparsifies_the_layers_that_tile_and_reports_the_rest():
    cfg = TrainConfig(method="kron", model="mlp", block_shape=(2, 16), rank=2, target_sparsity=0.5, **QUICK)
    m = train(cfg, progress=False)
    assert m["sparsified_layers"] == [0]  # 300x100 and 100x10 weights are not tiled by (2, 16)
    assert m["train_paths"][1:] == ["dense", "dense"]
    assert m["block_sparsity"] >= 0.5
    assert m["test_accuracy"] >= 0.7  # measured 0.795


def test_the_method_learns_on_the_linear_model():
    m = train(TrainConfig(method="kron", block_shape=(2, 2), rank=2, target_sparsity=0.6, **LEARN), progress=False)
    assert m["block_sparsity"] >= 0.6
    assert m["test_accuracy"] >= 0.8  # measured 0.868 (2026-12-01; dense, 1 epoch of QUICK: 0.864); chance 0.10


def test_the_method_learns_on_the_mlp():
    """2x2 blocks tile all three layers; the MLP runs the "norm" scale pin and the gather reorder."""
    m = train(TrainConfig(method="kron", model="mlp", block_shape=(2, 2), rank=2, target_sparsity=0.6, **LEARN),
              progress=False)
    assert m["sparsified_layers"] == [0, 1, 2] and m["block_sparsity"] >= 0.6
    assert m["test_accuracy"] >= 0.85  # measured 0.903 (2026-12-01); chance 0.10


@pytest.mark.parametrize("argv,message", [
    (["--block", "16x2"], "transposed shape (2, 16) tiles it"),
    (["--method", "magic"], "valid methods"),
    (["--target-sparsity", "1.5"], "target sparsity must be in [0, 1)"),
    (["--block", "2by2"], "OUTxIN"),
    (["--dataset", "npz:/nonexistent/file.npz"], "nonexistent"),
    (["--model", "resnet"], "valid models"),
])
def test_cli_user_errors_are_one_line(tmp_path, capsys, argv, message):
    """Errors found by kronsparse and by argparse (below) alike: one line, exit code 2."""
    code = main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--epochs", "1", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("argv,message", [
    (["train", "--scale-pin", "bogus"], "invalid choice: 'bogus'"),
    (["train", "--epochs", "ten"], "invalid int value"),
    (["nonsense"], "invalid choice"),
])
def test_cli_argument_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_cli_train_prints_the_row(tmp_path, capsys):
    code = main(["train", "--block", "2x2", "--rank", "2", "--target-sparsity", "0.5", "--n-train", "1000",
                 "--n-test", "200", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "| kron | linear | mnist | 2x2 | 2 |" in out
    assert json.loads((tmp_path / "config.json").read_text())["block_shape"] == [2, 2]


def test_cli_shapes_table(capsys):
    assert main(["shapes", "784", "10", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "| 2x16 | 16x2 | 809 |" in out and "fewest params" in out

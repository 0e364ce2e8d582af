"""Export a run as dense / BSR / factors, load it back without unpickling, run it fastest."""

import json
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kronsparse import KronLinear, swap_linear_
from kronsparse.cli import main
from kronsparse.export import FORMATS, export_model, read_export
from kronsparse.inference import BlockSparseLinear, bsr_matmul, load_layers, replace_layers_
from kronsparse.training.config import TrainConfig
from kronsparse.training.run_folder import export_run, load_model
from kronsparse.training.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A kron MLP run at 50% block sparsity in (2, 4) blocks and a dense linear run."""
    root = tmp_path_factory.mktemp("runs")
    quick = dict(n_train=1000, n_test=300, epochs=1, standardize=True)
    train(TrainConfig(method="kron", model="mlp", block_shape=(2, 4), rank=2, target_sparsity=0.5, **quick),
          out=root / "kron", progress=False)
    train(TrainConfig(method="dense", model="linear", **quick), out=root / "dense", progress=False)
    return root


def header(path):
    """The safetensors JSON header, read by hand: the format is 8 bytes of length, then JSON."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8: 8 + n])


def test_cli_writes_all_three_formats_and_they_agree(runs, capsys):
    run = runs / "kron"
    stored = load_file(str(run / "model.safetensors"))
    for fmt in FORMATS:
        assert main(["export", str(run), "--format", fmt]) == 0
        assert f"model.{fmt}.safetensors" in capsys.readouterr().out
    dense = load_file(str(run / "model.dense.safetensors"))
    assert set(dense) == {k for k in stored if ".kron." not in k}
    for k, v in dense.items():
        assert torch.equal(v, stored[k])
    meta, bsr = read_export(run / "model.bsr.safetensors")
    assert meta["format"] == "bsr" and meta["block_shape"] == [2, 4]
    for k in range(3):  # every MLP layer is on the (2, 4) grid
        m = meta["layers"][f"layers.{k}"]
        assert m["stored"] == "bsr" and m["kind"] == "linear"
        W = torch.sparse_bsr_tensor(bsr[f"layers.{k}.weight.crow_indices"], bsr[f"layers.{k}.weight.col_indices"],
                                    bsr[f"layers.{k}.weight.values"], tuple(m["shape"]),
                                    check_invariants=True).to_dense()  # a file read back: check its indices
        assert torch.equal(W, stored[f"layers.{k}.weight"])
        blocks = (~stored[f"layers.{k}.weight"].reshape(m["shape"][0] // 2, 2, -1, 4).ne(0).any(1).any(-1)).sum()
        assert bsr[f"layers.{k}.weight.values"].shape[0] == W.numel() // 8 - blocks  # zero blocks not stored
    factors = load_file(str(run / "model.factors.safetensors"))
    for k in range(3):
        for f in "SAB":
            assert torch.equal(factors[f"layers.{k}.{f}"], stored[f"layers.{k}.kron.{f}"])
    assert "kronsparse" in header(run / "model.factors.safetensors")["__metadata__"]


def test_every_format_and_representation_gives_the_same_model(runs):
    run = runs / "kron"
    x = torch.randn(64, 784)
    want = None
    for fmt in FORMATS:
        path = export_run(run, fmt, run / f"again.{fmt}.safetensors")
        for rep in ("auto", "dense", "bsr", "input_first", "factors_first"):
            model = load_model(path, rep)
            y = model(x)
            want = y if want is None else want
            torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        if fmt == "factors":
            assert set(model.layers[0].candidates()) == {"dense", "bsr", "input_first", "factors_first"}
    auto = load_model(run / "again.dense.safetensors")
    auto(x)
    assert all(64 in layer.choice for layer in auto.layers)


def test_the_linear_model_keeps_its_names_and_loads_into_nn_linear(runs):
    path = export_run(runs / "dense", "bsr")
    meta, tensors = read_export(path)
    assert set(meta["layers"]) == {""} and {"weight.values", "bias"} <= set(tensors)  # no prefix for "linear"
    dense = load_file(str(export_run(runs / "dense", "dense")))
    linear = nn.Linear(784, 10)
    linear.load_state_dict(dense)
    x = torch.randn(4, 784)
    torch.testing.assert_close(load_model(path)(x), linear(x))


@pytest.mark.parametrize("argv,message", [
    (["export", "/nonexistent/run"], "does not exist"),
    (["export", "RUN", "--format", "onnx"], "unknown export format 'onnx'; valid formats: dense, bsr, factors"),
    (["export", "DENSE", "--format", "factors"], "needs Kron layers"),
])
def test_cli_errors_are_one_line_with_exit_code_2(runs, argv, message, capsys):
    argv = [a.replace("DENSE", str(runs / "dense")).replace("RUN", str(runs / "kron")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bsr_matmul_handles_non_square_blocks():
    W = torch.randn(6, 32)
    W[2:4, 16:] = 0
    x = torch.randn(32, 5)
    torch.testing.assert_close(bsr_matmul(W.to_sparse_bsr((2, 16)), x), W @ x)
    torch.testing.assert_close(bsr_matmul(W.to_sparse_bsr((2, 2)), x), W @ x)


def test_export_any_swapped_model_and_load_it_back(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))
    swap_linear_(model, (4, 4), rank=2)
    with torch.no_grad():
        model[0].S[:4] = 0
    x = torch.randn(3, 16)
    want = model(x)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))
    plain.load_state_dict(load_file(str(export_model(model, tmp_path / "d.safetensors", "dense"))))
    torch.testing.assert_close(plain(x), want)
    again = nn.Sequential(KronLinear(16, 32, (4, 4), 2), nn.ReLU(), KronLinear(32, 8, (4, 4), 2), nn.LayerNorm(8))
    again.load_state_dict(load_file(str(export_model(model, tmp_path / "f.safetensors", "factors"))))
    torch.testing.assert_close(again(x), want)
    target = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.LayerNorm(8))
    replace_layers_(target, export_model(model, tmp_path / "b.safetensors", "bsr"))
    assert isinstance(target[0], BlockSparseLinear) and set(load_layers(tmp_path / "b.safetensors")) == {"0", "2"}
    torch.testing.assert_close(target(x), want)


def test_lenet5_exports_its_conv_as_bsr_and_runs_it(tmp_path):
    from kronsparse.training.models import build_model, kron_factory

    torch.manual_seed(0)
    model = build_model("lenet5", kron_factory((2, 2), 2))
    with torch.no_grad():
        model.layers[1].S[::2] = 0
    x = torch.randn(5, 784)
    want = model(x)
    path = export_model(model, tmp_path / "lenet.safetensors", "bsr", model_name="lenet5")
    meta, _ = read_export(path)
    conv = meta["layers"]["layers.1"]
    assert conv["kind"] == "conv2d" and conv["stored"] == "bsr" and conv["shape"] == [16, 6, 5, 5]
    for rep in ("auto", "dense", "bsr"):
        torch.testing.assert_close(load_model(path, rep)(x), want, rtol=1e-4, atol=1e-5)

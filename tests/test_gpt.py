"""The byte-level GPT: causality, the tied head left alone by every method, its costs against
torch.utils.flop_counter, bits per byte by hand, the pycode loader's checks, `kronsparse sample`, and
the pycode-gpt plan."""

import dataclasses
import gzip
import math
import shutil

import pytest
import torch
import torch.nn.functional as nnf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kronsparse.cli import main
from kronsparse.experiments import gpt as gpt_reproduce
from kronsparse.layers import KronLinear
from kronsparse.methods import METHODS
from kronsparse.sparsifier import Sparsifier
from kronsparse.training import text
from kronsparse.training.budget import check_training_memory
from kronsparse.training.config import TEXT_DATASETS, TrainConfig
from kronsparse.training.data import DataError, Dataset
from kronsparse.training.gpt import GPT, GPTSpec
from kronsparse.training.metrics import bits_per_byte, evaluate, training_costs
from kronsparse.training.models import build_model, dense_factory, kron_factory
from kronsparse.training.sample import load_gpt, sample_text
from kronsparse.training.train import train

TINY = {"width": 32, "layers": 2, "heads": 2}


def tiny(factory=dense_factory, context: int = 16) -> GPT:
    torch.manual_seed(0)
    return build_model("gpt", factory, context, 256, TINY)


@pytest.mark.parametrize("factory", [dense_factory, kron_factory((8, 8), 2)], ids=["dense", "kron"])
def test_a_future_token_never_changes_an_earlier_output(factory):
    model = tiny(factory).eval()
    x = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    base = model(x)
    for j in (1, 7, 15):
        changed = x.clone()
        changed[:, j:] = (changed[:, j:] + 1 + torch.arange(16 - j)) % 256
        out = model(changed)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=0)
        assert not torch.allclose(out[:, j], base[:, j])  # the changed position itself does see its token


@pytest.mark.filterwarnings("ignore:kronsparse. the sparsified layers hold")  # the tiny GPT is mostly embedding
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_sparsifies_only_the_block_linears_and_leaves_the_tied_head(method):
    model = tiny()
    options = {"candidates": ((4, 4), (8, 8))} if method == "select" else {}
    sp = Sparsifier(model, method, block_shape=(4, 4), total_steps=10, target_sparsity=0.5, **options)
    names = {f"blocks.{b}.{n}" for b in range(2) for n in ("attn.qkv", "attn.proj", "fc1", "fc2")}
    assert set(sp.layers) == names
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-3)
    x = torch.randint(0, 256, (2, 16))
    for _ in range(3):
        loss = nnf.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sp.step(opt)
    sp.finalize(opt)
    assert isinstance(model.wte, nn.Embedding) and len(model.layers) == 8
    assert (model.wte.weight != 0).all()  # the embedding, which is the head, stays dense
    logits = model(x)
    torch.testing.assert_close(logits, model.ln_f(_hidden(model, x)) @ model.wte.weight.T)


def _hidden(model: GPT, x):
    h = model.wte(x) + model.wpe.weight[: x.shape[1]]
    for block in model.blocks:
        h = block(h)
    return h


def test_the_tied_head_is_counted_once():
    model, d = tiny(), 32
    block = 3 * d * d + 3 * d + d * d + d + 4 * d * d + 4 * d + 4 * d * d + d + 4 * d  # qkv, proj, fc1, fc2, 2 norms
    expected = 2 * block + 256 * d + 16 * d + 2 * d  # token embedding = head, positions, final norm
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("factory", [dense_factory, kron_factory((8, 8), 2)], ids=["dense", "kron"])
def test_forward_macs_match_flop_counter(factory):
    model = tiny(factory)
    x = torch.randint(0, 256, (4, 16))
    with FlopCounterMode(display=False) as counter:
        model(x)
    ours = training_costs(model, 4)["train_macs"]
    if factory is dense_factory:
        assert ours * 4 == counter.get_total_flops() // 2  # every product: linears, q k^T, attn v, the head
    else:  # a Kronecker layer's path may reorder the products; the count agrees within the bias-free terms
        assert abs(ours * 4 - counter.get_total_flops() / 2) / (ours * 4) < 0.25
        assert any(isinstance(m, KronLinear) for m in model.modules())


def test_bits_per_byte_by_hand():
    class Fixed(nn.Module):  # logits that do not depend on the input: log-probabilities known exactly
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits.expand(*x.shape, 256)

    x = torch.zeros(3, 4, dtype=torch.long)
    y = torch.tensor([[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert bits_per_byte(Fixed(torch.zeros(256)), x, y) == pytest.approx(8.0)  # uniform over 256 bytes
    logits = torch.full((256,), -1e9)
    logits[0], logits[1] = math.log(3.0), 0.0  # p(0) = 3/4, p(1) = 1/4
    hand = (6 * -math.log2(0.75) + 6 * -math.log2(0.25)) / 12  # six 0s and six 1s among the 12 targets
    assert bits_per_byte(Fixed(logits), x, y, batch_size=2) == pytest.approx(hand, rel=1e-6)
    ds = Dataset("t", x, y, x, y, 256, x_val=x[:1], y_val=y[:1])
    assert evaluate(Fixed(logits), ds) == pytest.approx({"val_bpb": (2 * -math.log2(0.75) + 2 * -math.log2(0.25)) / 4,
                                                         "test_bpb": hand})


# ---------------------------------------------------------------- the pycode loader


def test_pycode_loads_checked_windows():
    ds = text.load_text("pycode", 64)
    assert ds.num_classes == 256 and ds.num_features == 64
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.long
    assert len(ds.x_train) == (4_659_646 - 1) // 64 and len(ds.x_val) == (275_054 - 1) // 64
    torch.testing.assert_close(ds.x_train[0, 1:].long(), ds.y_train[0, :-1])  # y is x one byte later
    assert ds.y_train[0, -1] == ds.x_train[1, 0]
    assert sorted(TEXT_DATASETS) == sorted(text.TEXT_DATASETS)


def _copy_pycode(tmp_path):
    src = text.find_text_dir("pycode")
    folder = tmp_path / "pycode"
    folder.mkdir()
    for name in text.TEXT_DATASETS["pycode"]:
        shutil.copy(src / name, folder / name)
    return folder


def test_a_truncated_or_altered_file_is_one_clear_error(tmp_path, monkeypatch):
    folder = _copy_pycode(tmp_path)
    val = folder / "val.txt.gz"
    val.write_bytes(val.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"val.txt.gz: checksum mismatch.*truncated") as err:
        text.read_splits.__wrapped__("pycode", str(tmp_path))
    assert "\n" not in str(err.value)
    val.write_bytes(gzip.compress(b"print('not the corpus')\n"))
    with pytest.raises(DataError, match="checksum mismatch"):
        text.read_splits.__wrapped__("pycode", str(tmp_path))
    (folder / "test.txt.gz").unlink()
    monkeypatch.setenv("KRONSPARSE_DATA", str(tmp_path))  # nowhere else to find the corpus
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(DataError, match="pycode: data files not found; put train.txt.gz, val.txt.gz, test.txt.gz"):
        text.read_splits.__wrapped__("pycode", str(tmp_path / "pycode"))


def test_gpt_options_are_checked_where_they_are_given():
    with pytest.raises(ValueError, match="--width is an option of --model gpt"):
        TrainConfig(model="mlp", width=64)
    with pytest.raises(ValueError, match="cannot train on --dataset mnist"):
        TrainConfig(model="gpt", dataset="mnist")
    with pytest.raises(ValueError, match="not divisible by 3 heads"):
        GPTSpec(width=32, heads=3)
    assert "width" not in TrainConfig().to_dict()  # older configs (no GPT options) stay equal


def test_a_long_context_is_refused_before_anything_is_allocated():
    cfg = TrainConfig(model="gpt", dataset="pycode", method="dense", context=8192, batch_size=2, **TINY)
    with pytest.raises(ValueError, match="training this model would need about .* GiB"):
        check_training_memory(cfg, 8192, 256, 568)  # its attention: 2 blocks x 3 x 2 heads x 8192^2 x 2 floats
    check_training_memory(dataclasses.replace(cfg, context=128), 128, 256, 36_000)  # the experiment's size passes


# ---------------------------------------------------------------- train and sample


def test_train_then_sample_a_tiny_run(tmp_path, capsys):
    cfg = TrainConfig(method="kron", model="gpt", dataset="pycode", block_shape=(8, 8), rank=2, target_sparsity=0.5,
                      optimizer="adamw", lr=1e-3, batch_size=4, epochs=1, n_train=8, n_test=2, context=16, **TINY)
    metrics = train(cfg, out=tmp_path / "run", progress=False)
    assert metrics["block_sparsity"] == pytest.approx(0.5) and 0 < metrics["val_bpb"] < 9
    model = load_gpt(tmp_path / "run")
    ds = text.load_text("pycode", 16)
    assert bits_per_byte(model, ds.x_test[:2], ds.y_test[:2]) == pytest.approx(metrics["test_bpb"], rel=1e-5)
    out = sample_text(model, "def ", tokens=20, seed=3)
    assert out.startswith("def ") and out == sample_text(model, "def ", tokens=20, seed=3)
    assert main(["sample", str(tmp_path / "run"), "--prompt", "class ", "--tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("class ")
    assert main(["sample", str(tmp_path / "nothing")]) == 2


# ---------------------------------------------------------------- the experiment plan


def test_the_pycode_gpt_plan():
    base = gpt_reproduce.base_config(True, {})
    specs = gpt_reproduce.plan([0], base)
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    methods = {(s.cfg.method, s.cfg.block_shape) for s in specs if s.role == "table"}
    for block in gpt_reproduce.BLOCKS:
        assert ("kron", block) in methods and ("block-magnitude", block) in methods
    assert {("rigl", (4, 4)), ("group-lasso", (4, 4)), ("elastic-group-lasso", (4, 4)), ("dense", (2, 2)),
            ("iterative-pruning", (4, 4)), ("select", (4, 4))} <= methods
    dense = gpt_reproduce.costs(base, dense_factory)
    for s in specs:
        if s.cfg.method == "kron" and s.cfg.block_shape != (4, 4):  # the larger blocks train cheaper than dense
            assert gpt_reproduce.costs(s.cfg, kron_factory(s.cfg.block_shape, s.cfg.rank))["train_macs"] < dense["train_macs"]
        if s.cfg.method == "kron" and s.cfg.block_shape == (4, 4):
            assert s.cfg.rank == 4
    small = [s.cfg for s in specs if s.role == "small"]
    assert small and all(c.method == "dense" and c.width < base.width and c.width % c.heads == 0 for c in small)
    assert gpt_reproduce.base_config(False, {"tokens_per_step": 4096}).batch_size == 32
    with pytest.raises(ValueError, match="multiple of the context"):
        gpt_reproduce.base_config(False, {"tokens_per_step": 100})


@pytest.mark.slow
def test_reproduce_pycode_gpt_end_to_end_on_a_tiny_gpt(tmp_path, capsys):
    out = tmp_path / "exp"
    args = ["reproduce", "pycode-gpt", "--quick", "--out", str(out), "--n-train", "16", "--n-test", "2", "--width", "32",
            "--heads", "2", "--layers", "1", "--context", "32", "--tokens-per-step", "256", "--jobs", "2"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    assert "## The paper's Table 3 claims on this model" in report and "### kron 16x16" in report
    assert "Partial" not in report and (out / "cost.png").is_file()
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + 14  # header, separator, one row per run of the quick plan
    wider = list(args)
    wider[wider.index("--width") + 1] = "64"
    assert main(wider) == 2  # other settings: refused before training
    assert "was made with other settings" in capsys.readouterr().err

"""kronsparse.plan (planner.py): counts against the cost model and flop_counter, the model left untouched, and the
predicted peak of a whole training step against the allocator's count on a real transformer."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kronsparse import Sparsifier, layer_costs
from kronsparse.planner import DENSE, plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from memory import peak_bytes  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.BatchNorm1d(128), nn.Linear(128, 32), nn.ReLU(),
                         nn.Linear(32, 10))


def test_counts_are_the_cost_models_and_flop_counters():
    model = mlp()
    x = torch.randn(48, 64)
    p = plan(model, x, candidates=[(16, 16)], ranks=[2], optimizer="adamw")
    assert p.rows == {"0": 48, "3": 48, "5": 48}
    dense, kron = p.settings[DENSE], p.settings["16x16 r2"]
    assert dense.train_params == sum(q.numel() for q in model.parameters())
    assert dense.optimizer_state_bytes == 2 * 4 * dense.train_params  # Adam's two moments in fp32
    # (16, 16) tiles 64->128 and 128->32, not the 10-output head, which stays dense
    tiled = [layer_costs(64, 128, (16, 16), 2), layer_costs(128, 32, (16, 16), 2)]
    saved = sum(c.dense_params - c.train_params for c in tiled)
    assert kron.train_params == dense.train_params - saved
    assert [lp.setting for lp in kron.layers] == ["16x16 r2", "16x16 r2", DENSE]
    # dense: 3x the forward's multiply-adds of every Linear, as flop_counter counts them (2 per MAC)
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(x)
    assert dense.step_macs == 3 * counter.get_total_flops() // 2


def test_rows_of_a_sequence_input_and_keyword_inputs():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(32, 32)

        def forward(self, tokens, scale=1.0):
            return self.proj(tokens) * scale

    p = plan(Net(), {"tokens": torch.randn(3, 7, 32), "scale": 2.0}, candidates=[(8, 8)], ranks=[1])
    assert p.rows == {"proj": 21}  # (3, 7, 32): 21 rows of 32 features
    assert p.settings["8x8 r1"].layers[0].path in ("input_first", "factors_first", "materialize")


def test_the_model_is_left_as_it_was():
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan(model, torch.randn(48, 64) * 3 + 1)  # a training-mode forward would move BatchNorm's running stats
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m) is not nn.Linear or m.weight.requires_grad for m in model.modules())


def test_ranks_above_the_full_kronecker_rank_are_skipped_and_bad_options_refused():
    model = nn.Sequential(nn.Linear(16, 16))
    p = plan(model, torch.randn(4, 16), candidates=[(8, 8)], ranks=[4, 5])
    assert set(p.settings) == {DENSE, "8x8 r4"}  # full rank of a 2x2 grid of 8x8 blocks: min(64, 4) = 4
    with pytest.raises(ValueError, match="unknown optimizer"):
        plan(model, torch.randn(4, 16), optimizer="lion")


def test_the_table_marks_what_saves():
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))
    p = plan(model, torch.randn(256, 512), candidates=[(16, 16), (1, 1)], ranks=[1])
    text = str(p)
    assert "| 16x16 r1 |" in text and "memory, compute" in text
    assert not p.settings["1x1 r1"].saves_compute  # 1x1 blocks: as many multiply-adds as dense, and more


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["dense", "16x16 r2", "8x8 r1"])
def test_the_predicted_peak_is_within_10_percent_of_the_allocators(setting):
    """A Llama decoder (transformers, random init) trained with AdamW through the Sparsifier: the
    plan's peak of one whole step against the allocator's count (held state + the step's peak)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    ids = torch.randint(0, 256, (1, 256))

    def decoder(name, module):
        return ".layers." in f".{name}"

    predicted = plan(model, {"input_ids": ids, "labels": ids}, layers=decoder, candidates=[(16, 16), (8, 8)],
                     ranks=[1, 2]).settings[setting]
    if setting == DENSE:
        sp = Sparsifier(model, "dense", block_shape=(16, 16), total_steps=100, layers=decoder)
    else:
        block, rank = setting.split(" r")
        sp = Sparsifier(model, "kron", block_shape=tuple(map(int, block.split("x"))), rank=int(rank),
                        target_sparsity=0.5, total_steps=100, layers=decoder)
    opt = sp.optimizer(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sp.step(opt)
        opt.zero_grad(set_to_none=True)

    step()
    step()
    held = [*model.parameters(), *model.buffers()] + [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    measured = sum(t.numel() * t.element_size() for t in held) + peak_bytes(step)
    assert abs(predicted.peak_bytes / measured - 1) <= 0.10, (predicted.peak_bytes, measured)


def test_shapes_on_a_model_of_the_command_line(capsys):
    from kronsparse.cli import main
    from kronsparse.training.models import build_model, kron_factory

    assert main(["shapes", "--model", "mlp", "--batch", "32", "--blocks", "2x16", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| 2x16 r2 |"))
    kron = build_model("mlp", kron_factory((2, 16), 2))  # what `train --method kron` builds
    assert row.split("|")[2].strip() == f"{sum(p.numel() for p in kron.parameters()):,}"
    assert "| dense | 266,610 |" in out


@pytest.mark.parametrize("argv, message", [
    (["shapes", "--model", "resnet"], "unknown model 'resnet'"),
    (["shapes", "--model", "mlp", "--batch", "0"], "--batch must be >= 1"),
    (["shapes", "--model", "mlp", "--batch", "100000000"], "over the limit"),
    (["shapes", "--model", "mlp", "--ranks", "0"], "--ranks must be >= 1"),
    (["shapes", "--model", "mlp", "--blocks", "2by2"], "--blocks must be like"),
    (["shapes", "--model", "mlp", "--optimizer", "lion"], "unknown --optimizer"),
    (["shapes"], "give a layer"),
])
def test_shapes_on_a_model_refuses_bad_input_in_one_line(argv, message, capsys):
    from kronsparse.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err

"""A new user's first hour: defaults, help, one-line refusals, quiet logs and warnings, the report."""

import subprocess
import sys

import pytest

from kronsparse.cli import METHOD_NAMES, MODEL_NAMES, build_parser, config_from_args, main
from kronsparse.experiments.mnist import fmt, table_title
from kronsparse.methods import METHODS
from kronsparse.training.config import TrainConfig
from kronsparse.training.models import ARCHITECTURES


def _train_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]


def test_every_train_option_says_what_it_means_and_its_default():
    for action in _train_parser()._actions:
        if action.dest == "help":
            continue
        assert action.help, action.option_strings
        assert "default" in action.help or action.required, action.option_strings


def test_help_lists_the_registered_methods_and_models():
    assert set(METHOD_NAMES) == set(METHODS)
    assert set(MODEL_NAMES) == set(ARCHITECTURES)


def test_inputs_are_standardised_by_default_and_can_be_left_raw():
    parser = build_parser()
    assert TrainConfig().standardize
    assert config_from_args(parser.parse_args(["train", "--out", "x"])).standardize
    assert not config_from_args(parser.parse_args(["train", "--out", "x", "--no-standardize"])).standardize
    assert config_from_args(parser.parse_args(["train", "--out", "x", "--standardize"])).standardize


@pytest.mark.parametrize("argv, message", [
    (["shapes", "0", "10"], "in features must be >= 1, got 0"),
    (["shapes", "784", "-3"], "out features must be >= 1, got -3"),
    (["shapes", "784", "10", "--rank", "0"], "rank must be >= 1, got 0"),
    (["shapes", "784", "10", "--rank", "-2"], "rank must be >= 1, got -2"),
])
def test_shapes_refuses_what_it_cannot_answer_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == f"kronsparse: error: {message}"


def test_shapes_table_has_a_header_for_every_column(capsys):
    assert main(["shapes", "784", "10", "--rank", "2"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| block"))
    assert all(cell.strip() for cell in header.strip("|").split("|"))


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, capsys):
    argv = ["train", "--n-train", "256", "--n-test", "64", "--epochs", "1", "--out", str(tmp_path)]
    assert main(argv) == 0  # pytest's captured stderr is not a terminal
    assert capsys.readouterr().err == ""


def test_bsr_export_and_load_print_no_torch_warnings(tmp_path):
    """In a fresh process: torch warns once per process, so a warning seen earlier would hide one."""
    code = f"""
import torch
from torch import nn
from kronsparse import swap_linear_
from kronsparse.export import export_model
from kronsparse.inference import replace_layers_
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
swap_linear_(model, block_shape=(4, 4), rank=2)
with torch.no_grad():
    model[0].S[:4] = 0
export_model(model, r"{tmp_path / 'm.safetensors'}", "bsr")
plain = replace_layers_(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), r"{tmp_path / 'm.safetensors'}")
for m in plain.modules():
    if hasattr(m, "representation"):
        m.representation = "bsr"
plain(torch.randn(8, 64))
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr, done.stderr


def test_one_seed_shows_no_spread_and_says_so():
    row = {"test_accuracy": 0.9198, "test_accuracy_std": 0.0, "seeds": 1}
    assert fmt(row, "test_accuracy") == "91.98"
    assert fmt({**row, "seeds": 3, "test_accuracy_std": 0.0005}, "test_accuracy") == "91.98 ± 0.05"
    assert table_title([{"seed": 0, "role": "table"}]) == "## Table (one seed: 0)"
    runs = [{"seed": s, "role": "table"} for s in (0, 1, 2)]
    assert table_title(runs) == "## Table (mean ± std over seeds 0, 1, 2)"

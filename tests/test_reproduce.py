"""`kronsparse reproduce` on a tiny slice: every file, and a table that equals the runs' metrics."""

import csv
import json

import pytest

from kronsparse.experiments import mnist as rep
from kronsparse.experiments import reproduce
from kronsparse.experiments.common import method_label
from kronsparse.experiments.mnist import command_of
from kronsparse.training.config import TrainConfig

TINY = {"n_train": 300, "n_test": 100, "epochs": 1}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    specs = reproduce("mnist-linear", out, seeds=[0], quick=True, overrides=TINY)
    return out, specs


def test_every_file_exists(tiny_run):
    out, specs = tiny_run
    for name in ("table.md", "table.csv", "report.md", "pareto.png", "cost.png", "masks.png"):
        assert (out / name).stat().st_size > 0, name
    for spec in specs:
        assert (out / "runs" / spec.name / "metrics.json").is_file()
        assert (out / "runs" / spec.name / "model.safetensors").is_file()
    methods = {s.cfg.method for s in specs}
    assert methods == {"dense", "select", *rep.SPARSE_METHODS}
    assert {s.cfg.rank for s in specs if s.cfg.method == "kron"} == {1, 2, 4}


def test_table_equals_the_runs_metrics(tiny_run):
    out, specs = tiny_run
    rows = list(csv.DictReader((out / "table.csv").open()))
    # two block shapes (dense, kron norm), selection, kron r4 at 2x16
    assert len(rows) == 2 * (2 + len(rep.SPARSE_METHODS)) + 1 + 1
    assert sum(r["method"] == "kron" and r["rank"] == "4" for r in rows) == 1  # rank 4 only where 5x below dense
    assert {r["method"] for r in rows} == {"dense", "select", "kron (scale-pin norm)", *rep.SPARSE_METHODS}
    for row in rows:
        if row["method"] == "select":
            continue
        spec = next(s for s in specs if s.role == "table" and method_label({"method": s.cfg.method,
                    "config": s.cfg.to_dict()}) == row["method"]
                    and f"{s.cfg.block_shape[0]}x{s.cfg.block_shape[1]}" == row["block"]
                    and row["rank"] in ("", str(s.cfg.rank)))
        m = json.loads((out / "runs" / spec.name / "metrics.json").read_text())
        for col in ("test_accuracy", "block_sparsity", "train_params", "train_macs", "inference_params"):
            assert float(row[col]) == pytest.approx(float(m[col]), rel=1e-12), (row["method"], col)
    report = (out / "report.md").read_text()
    assert "86.66%" in report and "7,850 paper FLOPs" in report and "block magnitude" in report


def test_started_again_it_skips_finished_runs(tiny_run, monkeypatch):
    out, _ = tiny_run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("kronsparse.experiments.runner.train", no_training)
    reproduce("mnist-linear", out, seeds=[0], quick=True, overrides=TINY)


def test_unknown_experiment():
    with pytest.raises(ValueError, match="valid experiments: mnist-linear"):
        reproduce("cifar", "unused", seeds=[0])


@pytest.mark.parametrize("model,pin,label", [
    ("linear", "auto", "kron"), ("linear", "decay", "kron"),  # configs from before "auto" say decay
    ("linear", "norm", "kron (scale-pin norm)"), ("mlp", "auto", "kron"), ("mlp", "norm", "kron"),
    ("mlp", "decay", "kron (scale-pin decay)")])
def test_a_scale_pin_gets_its_own_row_only_where_auto_would_not_pick_it(model, pin, label):
    m = {"method": "kron", "config": TrainConfig(model=model, scale_pin=pin).to_dict()}
    assert method_label(m) == label
    assert ("--scale-pin" in command_of(m)) == (label != "kron")


def test_the_mlp_table_has_kron_with_the_other_scale_pin():
    specs = rep.plan(rep.EXPERIMENTS["mnist-mlp"], [0], True, TrainConfig())
    pins = {s.cfg.scale_pin for s in specs if s.cfg.method == "kron" and s.role == "table"}
    assert pins == {"auto", "decay"}


def test_report_names_its_plots_and_one_seed_has_no_spread(tiny_run):
    out, _ = tiny_run
    report = (out / "report.md").read_text()
    assert "## Table (one seed: 0)" in report and "±" not in report
    for name in ("pareto.png", "cost.png", "masks.png"):
        assert f"[{name}]({name})" in report


def test_every_plot_has_a_title_labelled_axes_and_a_legend_or_colour_bar(tiny_run, monkeypatch):
    from kronsparse.experiments import plots
    from kronsparse.experiments.common import load_runs

    out, specs = tiny_run
    runs = load_runs(specs, out)
    figures = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path, dpi=110: figures.setdefault(path.name, fig))
    plots.pareto(runs, out / "pareto.png")
    plots.cost(runs, out / "cost.png")
    plots.masks(runs, out / "masks.png", out)
    for name, fig in figures.items():
        assert fig._suptitle is not None and fig._suptitle.get_text(), name
        labels = [t.get_text() for leg in [*fig.legends, *(ax.get_legend() for ax in fig.axes)] if leg
                  for t in leg.get_texts()]
        colour_bar = any(ax.get_label() == "<colorbar>" or ax.get_ylabel().startswith("weight /") for ax in fig.axes)
        assert labels or colour_bar, name
        if name != "masks.png":
            for ax in fig.axes:
                assert ax.get_xlabel() and (ax.get_ylabel() or ax is not fig.axes[0]), name
            assert any(label.startswith("select") for label in labels), name


@pytest.mark.parametrize("which", ["mnist", "vit"])
def test_a_reports_command_makes_the_runs_config(which):
    """The command a report prints for a run, parsed by the CLI, gives back that run's config
    (lambda and the factor lr included, where a run set them)."""
    import shlex

    from kronsparse.cli import build_parser, config_from_args
    from kronsparse.experiments import vit as vit_report

    base = dict(method="kron", block_shape=(4, 4), rank=4, target_sparsity=0.5, lam=0.1, factor_lr=4.0, seed=3)
    cfg = TrainConfig(**base) if which == "mnist" else TrainConfig(
        **base, model="vit", dataset="fashion-mnist", optimizer="adamw", lr=1e-3, batch_size=128, epochs=3, n_train=20000)
    line = command_of({"config": cfg.to_dict()}) if which == "mnist" else vit_report.command_of(cfg.to_dict())
    argv = shlex.split(line.replace("--out DIR", "--out unused"))[1:]
    assert config_from_args(build_parser().parse_args(argv)).to_dict() == cfg.to_dict()

"""The paper's MNIST comparison (`kronsparse reproduce mnist-linear | mnist-mlp | fashion-mnist-linear`):
every method at two block shapes, a sparsity sweep and a rank sweep; its tables, plots and the
paper's claims beside our numbers.

Every number is read back from the runs' metrics.json files; the table is never typed by hand.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text
from ..blocks import block_name, paper_block_name, tiles
from ..methods import get_method
from ..training.config import TrainConfig
from ..training.models import ARCHITECTURES, build_model, dense_factory, kron_factory, resolve_scale_pin
from . import plots
from .common import Experiment, Spec, holds, load_runs, markdown_table, mean_std, method_label, table_csv
from .common import command_of as train_command

SPARSE_METHODS = ("kron", "group-lasso", "elastic-group-lasso", "rigl", "iterative-pruning", "block-magnitude")
SELECT_CANDIDATES = ((2, 2), (2, 4), (2, 8), (2, 16))
COLUMNS = ("test_accuracy", "block_sparsity", "weight_sparsity", "train_params", "train_macs",
           "train_paper_flops", "inference_params", "inference_macs", "wall_seconds")
PAPER_RIGL_2X2 = (0.8666, 0.5061)  # block RigL, the paper's best baseline at 2x2 (its MNIST table)
PAPER_DENSE_16X2 = (7840, 7850)  # weights, paper FLOPs


@dataclass(frozen=True)
class MnistExperiment(Experiment):
    """One reproducible comparison: a model, a dataset and the block shapes with their target sparsity."""

    name: str
    model: str
    dataset: str
    blocks: dict  # block shape -> target block sparsity of the main table
    sweep: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    quick_sweep: tuple[float, ...] = (0.5, 0.8)

    def base_config(self, quick: bool, overrides: dict) -> TrainConfig:
        if "model" in overrides:
            raise ValueError(f"--model is for fashion-vit; {self.name} trains its own model")
        return TrainConfig(**{"epochs": 2 if quick else 10, "standardize": True, **overrides})

    def plan(self, seeds: list[int], quick: bool, base: TrainConfig) -> list[Spec]:
        return plan(self, seeds, quick, base)

    def write_report(self, specs: list[Spec], out: Path) -> None:
        write_report(specs, out, self)


EXPERIMENTS = {e.name: e for e in (
    MnistExperiment("mnist-linear", "linear", "mnist", {(2, 2): 0.6, (2, 16): 0.5}),
    MnistExperiment("mnist-mlp", "mlp", "mnist", {(2, 2): 0.6, (2, 16): 0.5}),
    MnistExperiment("fashion-mnist-linear", "linear", "fashion-mnist", {(2, 2): 0.6, (2, 16): 0.5}),
)}


def plan(exp: MnistExperiment, seeds: list[int], quick: bool, base: TrainConfig) -> list[Spec]:
    """The runs of the main table (all seeds, kron also with the scale pin "auto" does not pick), the
    sparsity sweep and the rank sweep (first seed)."""
    specs: list[Spec] = []
    other_pin = "norm" if resolve_scale_pin("auto", exp.model) == "decay" else "decay"

    def add(role: str, method: str, block, target, seed: int, rank: int = 2, **extra) -> None:
        name = f"{method}-{block_name(block)}-r{rank}-" + (f"t{target:g}" if target is not None else "dense") + f"-s{seed}"
        name += f"-{extra['scale_pin']}" if "scale_pin" in extra else ""
        cfg = dataclasses.replace(base, method=method, model=exp.model, dataset=exp.dataset, block_shape=block,
                                  rank=rank, target_sparsity=target, seed=seed, **extra)
        if all(s.name != name for s in specs):
            specs.append(Spec(name, cfg, role))

    cheap_rank4 = {block: rank4_is_cheap(exp.model, block) for block in exp.blocks}
    for seed in seeds:
        for block, target in exp.blocks.items():
            add("table", "dense", block, None, seed)
            for method in SPARSE_METHODS:
                add("table", method, block, target, seed)
            add("table", "kron", block, target, seed, scale_pin=other_pin)  # see methods/kron.py
            if cheap_rank4[block]:  # more rank for accuracy, still 5x fewer trainable parameters than dense
                add("table", "kron", block, target, seed, rank=4)
        target = next(iter(exp.blocks.values()))
        candidates = select_candidates(exp.model)
        add("table", "select", candidates[0], target, seed, candidates=candidates)
    for block in exp.blocks:
        for target in exp.quick_sweep if quick else exp.sweep:
            for method in SPARSE_METHODS:
                add("sweep", method, block, target, seeds[0])
        for rank in (1, 2, 4):
            add("cost", "kron", block, exp.blocks[block], seeds[0], rank=rank)
    return specs


def rank4_is_cheap(model: str, block) -> bool:
    """True when the model at rank 4 still trains at most a fifth of the dense model's parameters."""
    count = lambda factory: sum(p.numel() for p in build_model(model, factory).parameters())  # noqa: E731
    return 5 * count(kron_factory(block, 4)) <= count(dense_factory)


def select_candidates(model: str) -> tuple[tuple[int, int], ...]:
    """The selection candidates that tile every layer of `model` (selection uses one grid)."""
    sizes = ARCHITECTURES[model]
    return tuple(c for c in SELECT_CANDIDATES if all(tiles(i, o, c) for i, o in zip(sizes[:-1], sizes[1:])))


def group_key(m: dict) -> tuple:
    block = "select" if m["method"] == "select" else block_name(m["config"]["block_shape"])
    return method_label(m), block, m["rank"]


def table_rows(runs: list[dict]) -> list[dict]:
    """One row per (method, block shape): mean and std over seeds of every column."""
    groups: dict[tuple, list[dict]] = {}
    for m in runs:
        if m["role"] == "table":
            groups.setdefault(group_key(m), []).append(m)
    rows = []
    for (method, block, rank), ms in groups.items():
        shape = ms[0]["block_shape"]
        row = {"method": method, "block": block_name(shape), "paper_block": paper_block_name(shape),
               "rank": rank if get_method(ms[0]["method"]).trains_factors else "", "seeds": len(ms)}
        if method == "select":
            row["block"] = "select→" + ",".join(sorted({block_name(m["block_shape"]) for m in ms}))
        for col in COLUMNS:
            row[col], row[col + "_std"] = mean_std([float(m[col]) for m in ms])
        row["command"] = command_of(ms[0])
        rows.append(row)
    return rows


def command_of(m: dict) -> str:
    """The `kronsparse train` command that makes this run on its own."""
    return train_command(m["config"])


def fmt(row: dict, col: str) -> str:
    """Percent columns with their std over seeds; one seed has no spread to show."""
    mean, std = row[col], row[col + "_std"]
    if col in ("test_accuracy", "block_sparsity", "weight_sparsity"):
        return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if row.get("seeds", 1) > 1 else "")
    if col == "wall_seconds":
        return f"{mean:.1f}"
    return f"{mean:,.0f}"


def table_markdown(rows: list[dict]) -> str:
    head = ["method", "block (ours)", "paper name", "rank", "accuracy %", "block sparsity %", "weight sparsity %",
            "train params", "train MACs", "paper FLOPs", "inference params", "inference MACs", "wall s"]
    return markdown_table(head, [[r["method"], r["block"], r["paper_block"], str(r["rank"])] + [fmt(r, c) for c in COLUMNS]
                                 for r in rows])


def find(rows: list[dict], method: str, block: str, rank: int | None = None) -> dict | None:
    """The row of `method` at `block` (kron: rank 2, the paper's, unless `rank` says otherwise)."""
    rank = rank if rank is not None else (2 if method == "kron" else None)
    return next((r for r in rows if r["method"] == method and r["block"] == block
                 and (rank is None or r["rank"] == rank)), None)


def verdicts(rows: list[dict]) -> list[str]:
    """One line per claim of the paper: our numbers, and whether the claim holds here."""
    out = []
    k22, k216 = find(rows, "kron", "2x2"), find(rows, "kron", "2x16")
    if k22:
        acc, sp = k22["test_accuracy"], k22["block_sparsity"]
        ok = acc > PAPER_RIGL_2X2[0] and sp > PAPER_RIGL_2X2[1]
        out.append(f"- 2x2: the method beats the paper's block RigL (86.66% at 50.61% block sparsity): "
                   f"ours {100 * acc:.2f}% at {100 * sp:.2f}% — {holds(ok)}.")
        rigl = find(rows, "rigl", "2x2")
        if rigl:
            ok = acc > rigl["test_accuracy"] and sp >= rigl["block_sparsity"] - 1e-9
            out.append(f"- 2x2: the method beats our block RigL at equal budget: {100 * acc:.2f}% vs "
                       f"{100 * rigl['test_accuracy']:.2f}% at {100 * rigl['block_sparsity']:.2f}% — "
                       f"{holds(ok)}.")
    if k216:
        for method in ("group-lasso", "elastic-group-lasso"):
            b = find(rows, method, "2x16")
            if b:
                ok = k216["test_accuracy"] > b["test_accuracy"] and k216["block_sparsity"] >= b["block_sparsity"] - 1e-9
                out.append(f"- 2x16 (paper 16x2): the method beats {method} in accuracy and sparsity: "
                           f"{100 * k216['test_accuracy']:.2f}% / {100 * k216['block_sparsity']:.2f}% vs "
                           f"{100 * b['test_accuracy']:.2f}% / {100 * b['block_sparsity']:.2f}% — "
                           f"{holds(ok)}.")
        ip = find(rows, "iterative-pruning", "2x16")
        if ip:
            ok = k216["test_accuracy"] > ip["test_accuracy"]
            out.append(f"- 2x16: the method beats iterative pruning's accuracy: {100 * k216['test_accuracy']:.2f}% vs "
                       f"{100 * ip['test_accuracy']:.2f}% — {holds(ok)}.")
        dense = find(rows, "dense", "2x16")
        if dense:
            ratio = dense["train_params"] / k216["train_params"]
            out.append(f"- 2x16: the method trains about 10x fewer parameters than a dense baseline: "
                       f"{k216['train_params']:,.0f} vs {dense['train_params']:,.0f} ({ratio:.1f}x) — "
                       f"{holds(ratio >= 9.5)}.")
            weights = dense["train_params"] - (dense["train_paper_flops"] - dense["train_macs"])  # minus biases
            ok = (weights, dense["train_paper_flops"]) == PAPER_DENSE_16X2
            out.append(f"- The paper's 7.84K params / 7.85K FLOPs are the dense layer's cost: our dense run trains "
                       f"{weights:,.0f} weights (+10 biases) at {dense['train_paper_flops']:,.0f} paper FLOPs — "
                       f"{'matches' if ok else 'differs'}.")
    k4, gl = find(rows, "kron", "2x16", rank=4), find(rows, "group-lasso", "2x16")
    dense = find(rows, "dense", "2x16")
    if k4 and gl and dense:
        gap = k4["test_accuracy"] - gl["test_accuracy"]
        out.append(f"- 2x16 at rank 4 ({k4['train_params']:,.0f} trainable parameters, "
                   f"{dense['train_params'] / k4['train_params']:.1f}x fewer than dense): within 1.0 point of group "
                   f"lasso: {100 * k4['test_accuracy']:.2f}% vs {100 * gl['test_accuracy']:.2f}% ({100 * gap:+.2f} "
                   f"points) — {holds(gap >= -0.01)}.")
    for block in ("2x2", "2x16"):
        k, bm = find(rows, "kron", block), find(rows, "block-magnitude", block)
        if k and bm:
            out.append(f"- {block}: distance to gradual block magnitude pruning (trains a dense W) at equal target "
                       f"sparsity: {100 * (k['test_accuracy'] - bm['test_accuracy']):+.2f} points "
                       f"({100 * k['test_accuracy']:.2f}% vs {100 * bm['test_accuracy']:.2f}%).")
    return out


PLOTS = (("pareto.png", "test accuracy against block sparsity, one curve per method from the sparsity sweep "
                       "(first seed), the dense model as a dashed line"),
         ("cost.png", "test accuracy against trainable parameters and against training multiply-adds per "
                      "sample, every table run and kron at ranks 1, 2 and 4 (mean over seeds)"),
         ("masks.png", "the first layer's weights of every table run (first seed), one image per output "
                       "unit, exact zeros in dark grey"))


def table_title(runs: list[dict]) -> str:
    seeds = sorted({m["seed"] for m in runs if m["role"] == "table"})
    if len(seeds) == 1:
        return f"## Table (one seed: {seeds[0]})"
    return f"## Table (mean ± std over seeds {', '.join(map(str, seeds))})"


def write_report(specs: list[Spec], out: Path, experiment: MnistExperiment) -> None:
    runs = load_runs(specs, out)
    rows = table_rows(runs)
    write_text(out / "table.md", table_markdown(rows))
    write_text(out / "table.csv", table_csv(rows))
    plots.pareto(runs, out / "pareto.png")
    plots.cost(runs, out / "cost.png")
    plots.masks(runs, out / "masks.png", out)
    lines = ["# Reproduction report", "", f"Model: {experiment.model}, dataset: {experiment.dataset}.", "",
             table_title(runs), "", table_markdown(rows), "## The paper's claims", "",
             *verdicts(rows), "", "## Plots", ""]
    lines += [f"- [{name}]({name}): {what}." for name, what in PLOTS]
    lines += ["", "## Commands", ""]
    lines += [f"- {r['method']} {r['block']}: `{r['command']}`" for r in rows]
    write_text(out / "report.md", "\n".join(lines) + "\n")


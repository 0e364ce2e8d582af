"""The report of `kronsparse reproduce`: tables, plots and the paper's claims beside our numbers.

Every number is read back from the runs' metrics.json files; the table is never typed by hand.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from .config import explicit_scale_pin, method_label, optional_flags
from .atomic import write_text

COLUMNS = ("test_accuracy", "block_sparsity", "weight_sparsity", "train_params", "train_macs",
           "train_paper_flops", "inference_params", "inference_macs", "wall_seconds")
PAPER_RIGL_2X2 = (0.8666, 0.5061)  # block RigL, the paper's best baseline at 2x2 (its MNIST table)
PAPER_DENSE_16X2 = (7840, 7850)  # weights, paper FLOPs


def load_runs(specs, out: Path) -> list[dict]:
    """metrics.json of every spec, tagged with its role."""
    runs = []
    for spec in specs:
        m = json.loads((out / "runs" / spec.name / "metrics.json").read_text())
        runs.append({**m, "role": spec.role, "run": spec.name})
    return runs


def group_key(m: dict) -> tuple:
    block = "select" if m["method"] == "select" else f"{m['config']['block_shape'][0]}x{m['config']['block_shape'][1]}"
    return method_label(m), block, m["rank"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_rows(runs: list[dict]) -> list[dict]:
    """One row per (method, block shape): mean and std over seeds of every column."""
    groups: dict[tuple, list[dict]] = {}
    for m in runs:
        if m["role"] == "table":
            groups.setdefault(group_key(m), []).append(m)
    rows = []
    for (method, block, rank), ms in groups.items():
        shape = ms[0]["block_shape"]
        row = {"method": method, "block": f"{shape[0]}x{shape[1]}", "paper_block": f"{shape[1]}x{shape[0]}",
               "rank": rank if ms[0]["method"] in ("kron", "select") else "", "seeds": len(ms)}
        if method == "select":
            row["block"] = "select→" + ",".join(sorted({f"{m['block_shape'][0]}x{m['block_shape'][1]}" for m in ms}))
        for col in COLUMNS:
            row[col], row[col + "_std"] = mean_std([float(m[col]) for m in ms])
        row["command"] = command_of(ms[0])
        rows.append(row)
    return rows


def command_of(m: dict) -> str:
    """The `kronsparse train` command that makes this run on its own."""
    c = m["config"]
    parts = ["kronsparse train", f"--method {c['method']}", f"--model {c['model']}", f"--dataset {c['dataset']}",
             f"--block {c['block_shape'][0]}x{c['block_shape'][1]}", f"--rank {c['rank']}",
             f"--epochs {c['epochs']}", f"--seed {c['seed']}"]
    if c.get("target_sparsity") is not None:
        parts.append(f"--target-sparsity {c['target_sparsity']:g}")
    if c.get("candidates"):
        parts.append("--candidates " + ",".join(f"{a}x{b}" for a, b in c["candidates"]))
    if not c.get("standardize", False):  # standardised inputs are the default
        parts.append("--no-standardize")
    if c.get("method") in ("kron", "select") and explicit_scale_pin(c):
        parts.append(f"--scale-pin {c['scale_pin']}")
    parts += optional_flags(c)
    for key in ("n_train", "n_test"):
        if c.get(key):
            parts.append(f"--{key.replace('_', '-')} {c[key]}")
    return " ".join(parts) + " --out DIR"


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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], r["block"], r["paper_block"], str(r["rank"])] + [fmt(r, c) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


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
                   f"ours {100 * acc:.2f}% at {100 * sp:.2f}% — {'holds' if ok else 'does not hold'}.")
        rigl = find(rows, "rigl", "2x2")
        if rigl:
            ok = acc > rigl["test_accuracy"] and sp >= rigl["block_sparsity"] - 1e-9
            out.append(f"- 2x2: the method beats our block RigL at equal budget: {100 * acc:.2f}% vs "
                       f"{100 * rigl['test_accuracy']:.2f}% at {100 * rigl['block_sparsity']:.2f}% — "
                       f"{'holds' if ok else 'does not hold'}.")
    if k216:
        for method in ("group-lasso", "elastic-group-lasso"):
            b = find(rows, method, "2x16")
            if b:
                ok = k216["test_accuracy"] > b["test_accuracy"] and k216["block_sparsity"] >= b["block_sparsity"] - 1e-9
                out.append(f"- 2x16 (paper 16x2): the method beats {method} in accuracy and sparsity: "
                           f"{100 * k216['test_accuracy']:.2f}% / {100 * k216['block_sparsity']:.2f}% vs "
                           f"{100 * b['test_accuracy']:.2f}% / {100 * b['block_sparsity']:.2f}% — "
                           f"{'holds' if ok else 'does not hold'}.")
        ip = find(rows, "iterative-pruning", "2x16")
        if ip:
            ok = k216["test_accuracy"] > ip["test_accuracy"]
            out.append(f"- 2x16: the method beats iterative pruning's accuracy: {100 * k216['test_accuracy']:.2f}% vs "
                       f"{100 * ip['test_accuracy']:.2f}% — {'holds' if ok else 'does not hold'}.")
        dense = find(rows, "dense", "2x16")
        if dense:
            ratio = dense["train_params"] / k216["train_params"]
            out.append(f"- 2x16: the method trains about 10x fewer parameters than a dense baseline: "
                       f"{k216['train_params']:,.0f} vs {dense['train_params']:,.0f} ({ratio:.1f}x) — "
                       f"{'holds' if ratio >= 9.5 else 'does not hold'}.")
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
                   f"points) — {'holds' if gap >= -0.01 else 'does not hold'}.")
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


def write_report(specs, out: Path, experiment) -> None:
    from . import plots  # matplotlib: a dependency, a reproduction is not complete without its plots

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


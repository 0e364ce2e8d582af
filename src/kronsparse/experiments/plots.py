"""Pictures of a reproduction: accuracy against sparsity, against training cost, the masks (the MNIST
experiments); cost, masks and the selection experiment (fashion-vit).

Each figure has a title that says what it shows, labelled axes, and a legend or colour bar, so it
reads without the code; no text is placed on the data, so no labels overlap.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from ..blocks import block_mask_of, block_name, matrix_view, paper_block_name, parse_block  # noqa: E402
from ..training import run_folder  # noqa: E402
from ..training.plots import labelled_points  # noqa: E402
from ..training.plots import save as _save  # noqa: E402
from .common import method_label  # noqa: E402

MARKERS = "osD^v<>P*X"


def _block(m) -> str:
    return block_name(m["config"]["block_shape"])


def _paper(block: str) -> str:
    return paper_block_name(parse_block(block))


def _blocks(runs) -> list[str]:
    return sorted({_block(m) for m in runs if m["method"] != "select"}, key=lambda b: [int(v) for v in b.split("x")])


def _colours(names) -> dict[str, tuple]:
    """One fixed colour per method name, the same in every panel and figure."""
    cmap = plt.get_cmap("tab20")
    return {name: cmap((2 * k) % 20 + (2 * k) // 20 % 2) for k, name in enumerate(sorted(names))}


def _selected(m) -> str:
    """The block shape a select run kept (its metrics' block_shape), e.g. "2x2"."""
    return block_name(m["block_shape"])


def pareto(runs, path: Path) -> None:
    """Accuracy against block sparsity, one curve per method from its sparsity sweep (first seed);
    `select` as one point in the panel of the block shape it kept."""
    blocks = _blocks(runs)
    seed0 = min(m["seed"] for m in runs)
    first = [m for m in runs if m["seed"] == seed0]
    colours = _colours({method_label(m) for m in first} - {"dense"})
    fig, axes = plt.subplots(1, len(blocks), figsize=(6.5 * len(blocks), 4.8), squeeze=False)
    for ax, block in zip(axes[0], blocks):
        mine = [m for m in first if _block(m) == block and m["rank"] == 2 and m["method"] != "select"]
        for method in sorted({method_label(m) for m in mine} - {"dense"}):
            pts = sorted((m["block_sparsity"], m["test_accuracy"]) for m in mine if method_label(m) == method)
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "o-", ms=4, color=colours[method],
                    label=method)
        for m in mine:
            if m["method"] == "dense" and m["role"] == "table":
                ax.axhline(100 * m["test_accuracy"], color="k", ls="--", lw=1, label="dense (no sparsity)")
        for m in first:
            if m["method"] == "select" and (_selected(m) == block or (_selected(m) not in blocks and block == blocks[0])):
                ax.plot(100 * m["block_sparsity"], 100 * m["test_accuracy"], "*", ms=14, color=colours["select"],
                        markeredgecolor="k", label=f"select (one run, kept {_selected(m)})")
        ax.set(title=f"block {block} (paper: {_paper(block)})", xlabel="block sparsity % (exactly zero blocks)",
               ylabel="test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Test accuracy against block sparsity (sparsity sweep, seed {seed0})")
    _save(fig, path)


def _cost_series(runs) -> dict[tuple[str, str], dict]:
    """(name, block) -> mean accuracy and costs over seeds; kron and select named with their rank."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for m in runs:
        if m["role"] not in ("table", "cost"):
            continue
        name = method_label(m) + (f" r{m['rank']}" if m["method"] == "kron" else "")
        block = f"select→{_selected(m)}" if m["method"] == "select" else _block(m)
        groups.setdefault((name, block), []).append(m)
    return {key: {k: float(np.mean([m[k] for m in ms])) for k in ("train_params", "train_macs", "test_accuracy")}
            for key, ms in groups.items()}


def cost(runs, path: Path) -> None:
    """Accuracy against trainable parameters and forward multiply-adds per sample while training:
    colour is the method (kron at each rank), marker the block shape, both explained in the legend."""
    series = _cost_series(runs)
    names = sorted({n for n, _ in series})
    blocks = sorted({b for _, b in series}, key=lambda b: (b.startswith("select"), b))
    colours = _colours(names)
    markers = {b: MARKERS[k % len(MARKERS)] for k, b in enumerate(blocks)}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for (xkey, label), ax in zip((("train_params", "trainable parameters"),
                                  ("train_macs", "training multiply-adds per sample, forward")), axes):
        for (name, block), v in series.items():
            if name == "dense":  # the same model whatever the block: the ceiling, drawn on top
                ax.axhline(100 * v["test_accuracy"], color="k", ls="--", lw=1, zorder=1)
                ax.scatter(v[xkey], 100 * v["test_accuracy"], s=60, color="k", marker="x", zorder=4)
                continue
            ax.scatter(v[xkey], 100 * v["test_accuracy"], s=30, color=colours[name], marker=markers[block],
                       edgecolors="k", linewidths=0.4, alpha=0.8, zorder=3)
        xs = [v[xkey] for v in series.values()]
        if max(xs) > 10 * min(xs):
            ax.set_xscale("log")
            label += " (log scale)"
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy %")
    handles = [plt.Line2D([], [], ls="--", lw=1, marker="x", color="k", label="dense (no sparsity)")] if "dense" in names else []
    handles += [plt.Line2D([], [], ls="", marker="o", color=colours[n], label=n) for n in names if n != "dense"]
    handles += [plt.Line2D([], [], ls="", marker=markers[b], color="k", fillstyle="none", label=f"block {b}")
                for b in blocks]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, title="colour: method\nmarker: block")
    fig.suptitle("Test accuracy against training cost (main table and kron at ranks 1, 2, 4; mean over seeds)")
    fig.tight_layout()
    _save(fig, path)


def masks(runs, path: Path, out: Path) -> None:
    """The final first-layer weights of each table run (first seed), zeros in dark grey; for a linear
    model on MNIST each row is a class template of 28x28 pixels. Each image is scaled by its own
    largest |weight|, which the colour bar says."""
    seed0 = min(m["seed"] for m in runs)
    chosen = [m for m in runs if m["role"] == "table" and m["seed"] == seed0]
    cols = 10
    fig, axes = plt.subplots(len(chosen), cols, figsize=(12, 1.25 * len(chosen) + 1), squeeze=False)
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="0.2")
    image = None
    for r, (row, m) in enumerate(zip(axes, chosen)):
        W = run_folder.layer_weights(out / "runs" / m["run"], m["model"])[0].numpy()
        side = int(round(W.shape[1] ** 0.5))
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"unit {k}", fontsize=9)
            if k < W.shape[0] and side * side == W.shape[1]:
                img = np.where(W[k] == 0, np.nan, W[k]).reshape(side, side)
                lim = np.nanmax(np.abs(img)) if np.isfinite(img).any() else 1.0
                image = ax.imshow(img / lim, cmap=cmap, vmin=-1, vmax=1)
        block = f"select→{_selected(m)}" if m["method"] == "select" else _block(m)
        rank = f" r{m['rank']}" if m["method"] == "kron" else ""
        row[0].set_ylabel(f"{method_label(m)}{rank}\n{block}, {100 * m['block_sparsity']:.0f}% of blocks zero",
                          fontsize=9, rotation=0, ha="right", va="center")
    if image is not None:
        bar = fig.colorbar(image, cax=fig.add_axes((0.89, 0.3, 0.015, 0.4)))
        bar.set_label("weight / largest |weight| of its image; dark grey: exactly zero", fontsize=9)
    height = fig.get_size_inches()[1]
    fig.subplots_adjust(top=1 - 0.9 / height, bottom=0.1 / height, right=0.86)
    fig.suptitle(f"First-layer weights of each table run, one 28x28 image per output unit (seed {seed0})",
                 fontsize=12, y=1 - 0.25 / height)
    _save(fig, path, dpi=80)


# --------------------------------------------------------------------------------------------
# fashion-vit
# --------------------------------------------------------------------------------------------


def vit_cost(table: list[dict], alone: list[dict], path: Path) -> None:
    """Accuracy against trainable parameters and against training FLOPs, one labelled point per row."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"wspace": 0.45})  # room for the labels
    rows = table + [a for a in alone if a["block"] != "4x4"]
    colours = _colours(sorted({r["method"] for r in rows}))
    for (key, label, scale), ax in zip((("train_params", "trainable parameters", "log"),
                                        ("flop_counter_train_flops", "training FLOPs / sample (fwd+bwd)", "linear")),
                                       axes):
        labelled_points(ax, [(r[key], 100 * r["test_accuracy"], f"{r['method']} {r['block']}", colours[r["method"]])
                             for r in rows], log_x=scale == "log")
        ax.set(xscale=scale, xlabel=label, ylabel="test accuracy %")
        if scale == "log":  # ticks at 1, 2, 5 x 10^k as plain numbers (matplotlib's minor labels overlapped)
            ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    _save(fig, path)


def vit_masks(runs: list[dict], out: Path, path: Path) -> None:
    """The block mask of the first transformer block's fc1 in every run of the first seed."""
    seed0 = min(m["seed"] for m in runs)
    chosen = [m for m in runs if m["seed"] == seed0]
    k_fc1 = 3  # patch embedding, qkv, proj, fc1: the first block's MLP input layer
    fig, axes = plt.subplots(1, len(chosen), figsize=(1.6 * len(chosen), 3.2), squeeze=False)
    for ax, m in zip(axes[0], chosen):
        W = run_folder.layer_weights(out / "runs" / m["run"], m["model"])[k_fc1]
        mask = block_mask_of(*matrix_view(W, tuple(m["block_shape"])))
        ax.imshow(mask.numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_title(f"{m['method']}\n{block_name(m['block_shape'])}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("block mask of the first block's fc1 (black: kept)", fontsize=9, y=1.08)
    _save(fig, path)


def selection(sel: dict, alone: list[dict], path: Path) -> None:
    """The selected run's accuracy beside each candidate block shape trained alone."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    blocks = sorted({a["block"] for a in alone}, key=lambda b: int(b.split("x")[0]))
    accs = [100 * next(a for a in alone if a["block"] == b)["test_accuracy"] for b in blocks]
    ax.bar(blocks, accs, color="0.7", label="kron, trained alone")
    ax.axhline(100 * sel["test_accuracy"], color="C3", label=f"select (kept {'/'.join(sel['block_chosen'])})")
    ax.set(ylim=(min(accs + [100 * sel["test_accuracy"]]) - 3, max(accs + [100 * sel["test_accuracy"]]) + 1),
           ylabel="test accuracy %", xlabel="block shape")
    ax.legend(fontsize=8)
    _save(fig, path)

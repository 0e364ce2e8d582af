"""Pictures of a reproduction: accuracy against sparsity, against training cost, and the masks."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .io import atomic_write  # noqa: E402
from .report import method_label  # noqa: E402


def _save(fig, path: Path, dpi: int = 110) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)


def _blocks(runs) -> list[str]:
    return sorted({f"{m['config']['block_shape'][0]}x{m['config']['block_shape'][1]}" for m in runs
                   if m["method"] != "select"}, key=lambda b: [int(v) for v in b.split("x")])


def _block(m) -> str:
    return f"{m['config']['block_shape'][0]}x{m['config']['block_shape'][1]}"


def pareto(runs, path: Path) -> None:
    """Accuracy against block sparsity, one curve per method from its sparsity sweep (first seed)."""
    blocks = _blocks(runs)
    fig, axes = plt.subplots(1, len(blocks), figsize=(6 * len(blocks), 4.5), squeeze=False)
    seed0 = min(m["seed"] for m in runs)
    for ax, block in zip(axes[0], blocks):
        mine = [m for m in runs if _block(m) == block and m["seed"] == seed0 and m["rank"] == 2
                and m["method"] != "select"]
        for method in sorted({method_label(m) for m in mine} - {"dense"}):
            pts = sorted((m["block_sparsity"], m["test_accuracy"]) for m in mine if method_label(m) == method)
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=method)
        for m in mine:
            if m["method"] == "dense":
                ax.axhline(100 * m["test_accuracy"], color="k", ls="--", lw=1, label="dense")
        ax.set(title=f"block {block} (paper {block.split('x')[1]}x{block.split('x')[0]})",
               xlabel="block sparsity %", ylabel="test accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path)


def cost(runs, path: Path) -> None:
    """Accuracy against trainable parameters and forward multiply-adds per sample while training."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    table = [m for m in runs if m["role"] in ("table", "cost")]
    for (xkey, label), ax in zip((("train_params", "trainable parameters"), ("train_macs", "train MACs / sample")),
                                 axes):
        for m in table:
            name = f"{method_label(m)} {_block(m)}" + (f" r{m['rank']}" if m["method"] == "kron" else "")
            ax.scatter(m[xkey], 100 * m["test_accuracy"], s=18)
            ax.annotate(name, (m[xkey], 100 * m["test_accuracy"]), fontsize=6, alpha=0.8)
        ax.set(xscale="log", xlabel=label, ylabel="test accuracy %")
        ax.grid(alpha=0.3)
    _save(fig, path)


def masks(runs, path: Path, out: Path) -> None:
    """The final first-layer weights of each table run (first seed), zeros in grey; for a linear
    model on MNIST each row is a class template of 28x28 pixels."""
    from safetensors.torch import load_file

    seed0 = min(m["seed"] for m in runs)
    chosen = [m for m in runs if m["role"] == "table" and m["seed"] == seed0]
    fig, axes = plt.subplots(len(chosen), 10, figsize=(10, 1.1 * len(chosen)), squeeze=False)
    cmap = plt.get_cmap("coolwarm").with_extremes(bad="0.85")
    for row, m in zip(axes, chosen):
        t = load_file(str(out / "runs" / m["run"] / "model.safetensors"))
        W = (t["weight"] if "weight" in t else t["layers.0.weight"]).numpy()
        side = int(round(W.shape[1] ** 0.5))
        for k, ax in enumerate(row):
            ax.set_xticks([])
            ax.set_yticks([])
            if k < W.shape[0] and side * side == W.shape[1]:
                img = np.where(W[k] == 0, np.nan, W[k]).reshape(side, side)
                lim = np.nanmax(np.abs(img)) if np.isfinite(img).any() else 1.0
                ax.imshow(img, cmap=cmap, vmin=-lim, vmax=lim)
        row[0].set_ylabel(f"{method_label(m)}\n{_block(m)}", fontsize=6, rotation=0, ha="right", va="center")
    _save(fig, path, dpi=70)

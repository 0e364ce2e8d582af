"""The pictures `kronsparse train` draws in a run folder (pattern selection's group norms), and the
one way every figure of the application is saved (atomically, as PNG).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..atomic import atomic_write  # noqa: E402


def save(fig, path: Path, dpi: int = 110) -> None:
    """Write `fig` to `path` as PNG, atomically, and close it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))
    plt.close(fig)


def group_norms(trace: dict, steps_per_epoch: int, selected_at: int | None, path: Path) -> None:
    """Two panels over training: ||S_k||_2 (the penalised group) and ||W_k||_F (the weight it carries)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = [s / steps_per_epoch for s in trace["step"]]
    for name, values in trace.items():
        if name == "step":
            continue
        bo, bi = name.split("x")
        for ax, series in zip(axes, zip(*values)):
            ax.plot(epochs, series, label=f"{name} (paper {bi}x{bo})")
    for ax, label in zip(axes, ("group norm ||S_k||_2", "weight norm ||W_k||_F")):
        if selected_at is not None:
            ax.axvline((selected_at + 1) / steps_per_epoch, color="gray", ls="--", lw=1, label="selected")
        ax.set(xlabel="epoch", ylabel=label)
    axes[0].legend(fontsize=8)
    fig.suptitle("pattern selection: every candidate block shape over training")
    fig.tight_layout()
    save(fig, path, dpi=120)

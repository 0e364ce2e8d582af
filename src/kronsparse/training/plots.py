"""The pictures `kronsparse train` draws in a run folder (pattern selection's group norms), the one
way every figure of the application is saved (atomically, as PNG), and the labelled points of the
experiments' cost plots.
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


def labelled_points(ax, points: list[tuple[float, float, str, str]], log_x: bool = True) -> None:
    """Scatter (x, y, name, colour) points with one label per name, at the mean y of its points, to
    the right of its cluster of about one x (within 10%; within 0.1% of the span on a linear axis):
    the labels of a cluster stack upward instead of overlapping (the dense-W methods share one cost)."""
    span = (max(p[1] for p in points) - min(p[1] for p in points)) or 1.0
    xs = [p[0] for p in points]
    near = (lambda a, b: b < 1.1 * a) if log_x else (lambda a, b: b - a <= 1e-3 * ((max(xs) - min(xs)) or 1.0))
    clusters: list[list[tuple]] = []
    for point in sorted(points):
        if clusters and near(clusters[-1][0][0], point[0]):
            clusters[-1].append(point)
        else:
            clusters.append([point])
    for cluster in clusters:
        floor, right = -float("inf"), max(x for x, *_ in cluster)
        names: dict[str, list[float]] = {}
        for x, y, name, colour in cluster:
            ax.scatter(x, y, s=18, color=colour)
            names.setdefault(name, []).append(y)
        for name, ys in sorted(names.items(), key=lambda item: sum(item[1]) / len(item[1])):
            label_y = max(sum(ys) / len(ys), floor)
            floor = label_y + 0.035 * span
            ax.annotate(name, (right, label_y), xytext=(6, 0), textcoords="offset points", fontsize=7, va="center")
    ax.margins(x=0.3)  # room for the labels of the rightmost points

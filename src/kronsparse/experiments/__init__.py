"""The experiments behind `kronsparse reproduce`: one pipeline (runner.py), what the reports share
(common.py, plots.py) and one module per experiment with its plan, tables and verdicts (mnist.py,
vit.py). Adding an experiment is a module with an `Experiment` and a line in EXPERIMENTS below."""

from __future__ import annotations

from pathlib import Path

from .common import Experiment, Spec
from .mnist import EXPERIMENTS as MNIST
from .runner import reproduce_experiment
from .vit import EXPERIMENTS as VIT

EXPERIMENTS: dict[str, Experiment] = {**MNIST, **VIT}


def reproduce(name: str, out: str | Path, seeds: list[int], quick: bool = False, jobs: int = 1,
              overrides: dict | None = None) -> list[Spec]:
    """Run (or finish) the plan of experiment `name` in `out`, then write its report there."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}")
    return reproduce_experiment(EXPERIMENTS[name], out, seeds, quick, jobs, overrides)

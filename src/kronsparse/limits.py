"""Upper bounds on what a user or a file may ask for, checked before any memory or compute is spent.

Each bound is sane for the experiments kronsparse runs and can be raised knowingly through an
environment variable, named in every message that refuses a value: `KRONSPARSE_MAX_RANK=512`.
"""

from __future__ import annotations

import os

DEFAULTS = {
    "rank": 64,  # Kronecker terms per layer (the paper uses 1-4; any block-sparse W needs <= min(m1*n1, bo*bi))
    "jobs": None,  # parallel runs of `reproduce`; None: the CPU cores this process may use
    "threads": None,  # torch threads; None: 4 x the usable cores (more only slows training down)
    "classes": 100_000,  # classes of an npz dataset (largest label + 1)
    "data_bytes": 2**28,  # float32 bytes of all inputs of a dataset (MNIST: 2.2e8), and of any one array
    "train_bytes": 2**30,  # estimated memory of a training run (training/budget.py); MNIST MLP at rank 64: 0.3 GiB
    "tensor_elements": 2**26,  # dense weight elements built from the BSR / factor layers of one export file
    "features": 2**24,  # layer sizes for `kronsparse shapes`
    "shape_rows": 20_000,  # block shapes `kronsparse shapes` lists (784 x 10: 60)
    "epochs": 100_000,
    "candidates": 16,  # block shapes trained at once by --method select
    "batch_size": 2**20,
}


def env_name(name: str) -> str:
    return f"KRONSPARSE_MAX_{name.upper()}"


def limit(name: str) -> int:
    """The bound called `name`: its environment variable if set, else the default."""
    raw = os.environ.get(env_name(name))
    if raw is not None:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{env_name(name)} must be an integer, got {raw!r}") from None
        if value < 1:
            raise ValueError(f"{env_name(name)} must be >= 1, got {value}")
        return value
    if name in ("jobs", "threads"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return cores if name == "jobs" else 4 * cores
    return DEFAULTS[name]


def check_at_most(name: str, value: int, what: str | None = None) -> None:
    """ValueError naming the bound and how to raise it, when value exceeds limit(name)."""
    bound = limit(name)
    if value > bound:
        raise ValueError(f"{what or name} {value} is over the limit of {bound} "
                         f"(set {env_name(name)} to allow more, knowing the memory and time it takes)")

"""`kronsparse reproduce`: the paper's MNIST comparison as a resumable set of runs, then its report.

Every run lives in DIR/runs/<name>/ with its own metrics.json and model.safetensors; a run whose
metrics.json exists is skipped, so the command can be started again after an interruption.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import rundir
from .config import TrainConfig, resolve_scale_pin
from .limits import check_at_most
from .blocks import tiles
from .models import ARCHITECTURES, build_model, dense_factory, kron_factory
from .train import train

SPARSE_METHODS = ("kron", "group-lasso", "elastic-group-lasso", "rigl", "iterative-pruning", "block-magnitude")
SELECT_CANDIDATES = ((2, 2), (2, 4), (2, 8), (2, 16))


@dataclass(frozen=True)
class Experiment:
    """One reproducible comparison: a model, a dataset and the block shapes with their target sparsity."""

    model: str
    dataset: str
    blocks: dict  # block shape -> target block sparsity of the main table
    sweep: tuple[float, ...] = (0.3, 0.5, 0.7, 0.9)
    quick_sweep: tuple[float, ...] = (0.5, 0.8)


EXPERIMENTS = {
    "mnist-linear": Experiment("linear", "mnist", {(2, 2): 0.6, (2, 16): 0.5}),
    "mnist-mlp": Experiment("mlp", "mnist", {(2, 2): 0.6, (2, 16): 0.5}),
    "fashion-mnist-linear": Experiment("linear", "fashion-mnist", {(2, 2): 0.6, (2, 16): 0.5}),
}


@dataclass(frozen=True)
class Spec:
    """One run of the plan: its folder name, its config and the role it plays in the report."""

    name: str
    cfg: TrainConfig
    role: str  # "table", "sweep" or "cost"


def block_name(block) -> str:
    return f"{block[0]}x{block[1]}"


def plan(exp: Experiment, seeds: list[int], quick: bool, base: TrainConfig) -> list[Spec]:
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


def _die_with_parent(parent: int) -> None:
    """Worker initialiser: the worker ends when `parent` dies, even by SIGKILL (Linux: the kernel sends
    SIGKILL through PR_SET_PDEATHSIG; elsewhere a thread watches the parent pid every second)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="kronsparse-parent-watch").start()


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _run_one(spec: Spec, out: Path, threads: int | None) -> str:
    if threads:
        torch.set_num_threads(threads)
    train(spec.cfg, out=out / "runs" / spec.name, progress=False)
    return spec.name


def run_plan(specs: list[Spec], out: Path, jobs: int = 1) -> None:
    """Train every spec whose folder holds no complete run yet; show which run of how many is going."""
    todo = [s for s in specs if rundir.finished_metrics(out / "runs" / s.name) is None]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", unit="run",
               disable=None)  # None: only on a terminal, not in a redirected log
    if jobs <= 1:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            _run_one(spec, out, None)
            bar.update()
    else:
        with ProcessPoolExecutor(jobs, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
            for name in pool.map(_run_one, todo, [out] * len(todo), [1] * len(todo)):
                bar.set_postfix_str(name)
                bar.update()
    bar.close()


def reproduce(name: str, out: str | Path, seeds: list[int], quick: bool = False, jobs: int = 1,
              overrides: dict | None = None) -> list[Spec]:
    """Run (or finish) the whole plan of experiment `name` in `out`, then write the report there."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; valid experiments: {', '.join(EXPERIMENTS)}")
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    base = TrainConfig(**{"epochs": 2 if quick else 10, "standardize": True, **(overrides or {})})
    if not 1 <= jobs:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    check_at_most("jobs", jobs, "--jobs")
    seeds = seeds[:1] if quick else seeds
    specs = plan(EXPERIMENTS[name], seeds, quick, base)
    with rundir.open_folder(out) as folder:
        check_identity(specs, folder)
        run_plan(specs, folder, jobs)
        from .report import write_report

        write_report(specs, folder, EXPERIMENTS[name])
    return specs


def check_identity(specs: list[Spec], out: Path) -> None:
    """Refuse, before training anything, a folder whose finished runs were made with other settings
    (e.g. --epochs or --n-train): their results must never stand in for this plan's runs."""
    for spec in specs:
        done = rundir.finished_metrics(out / "runs" / spec.name)
        if done is None or done["config"] == spec.cfg.to_dict():
            continue
        ours = spec.cfg.to_dict()
        diff = [f"{k} {done['config'].get(k)!r} there, {ours.get(k)!r} here"
                for k in sorted(set(ours) | set(done["config"])) if done["config"].get(k) != ours.get(k)]
        raise rundir.RunFolderError(f"{out / 'runs' / spec.name} was made with other settings ({'; '.join(diff)}); "
                                    "use another --out, or delete its runs folder to redo them")

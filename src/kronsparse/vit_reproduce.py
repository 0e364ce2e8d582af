"""`kronsparse reproduce fashion-vit`: the paper's Table 3 and its block-size selection experiment in
miniature, on Fashion-MNIST with a compact ViT (or the paper's ViT-tiny at 224 px with --model vit-tiny).

Every method at 50% of 4x4 blocks (rank 4 for the Kronecker methods), the dense ceiling, pattern
selection over 2x2 / 4x4 / 8x8 and each candidate trained alone. Runs live in DIR/runs/<name>/ as in
the MNIST experiments (finished runs are reused, a folder of other settings is refused); each run
trains in a fresh worker process so that its peak memory is its own.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import rundir
from .config import TrainConfig
from .limits import check_at_most
from .atomic import write_json
from .reproduce import Spec, _die_with_parent, block_name, check_identity
from .train import train
from .vit import VIT_MODELS
from .vit_report import memory_file, write_report

METHODS = ("kron", "group-lasso", "elastic-group-lasso", "rigl", "block-magnitude", "iterative-pruning")
BLOCK = (4, 4)
TARGET = 0.5
RANK = 4
CANDIDATES = ((2, 2), (4, 4), (8, 8))
# The recipe of the hand-tried runs: AdamW 1e-3, batch 128, inputs standardised.
RECIPE = {"dataset": "fashion-mnist", "optimizer": "adamw", "lr": 1e-3, "batch_size": 128, "standardize": True,
          "rank": RANK}
QUICK = {"epochs": 3, "n_train": 20_000}  # one seed; under 15 minutes with --jobs 2 on 2 CPU cores
FULL = {"epochs": 10}  # all 60,000 training images


def plan(seeds: list[int], base: TrainConfig) -> list[Spec]:
    """Role "table": dense and every method at 50% of 4x4 blocks, and select over the candidates;
    role "alone": kron at each other candidate (kron 4x4 is in the table), for the selection claim."""
    specs: list[Spec] = []

    def add(role: str, method: str, block, target, **extra) -> None:
        name = f"{method}-{block_name(block)}-r{base.rank}-" + (f"t{target:g}" if target is not None else "dense")
        cfg = dataclasses.replace(base, method=method, block_shape=block, target_sparsity=target, **extra)
        specs.append(Spec(f"{name}-s{cfg.seed}", cfg, role))

    for seed in seeds:
        base = dataclasses.replace(base, seed=seed)
        add("table", "dense", BLOCK, None)
        for method in METHODS:
            add("table", method, BLOCK, TARGET)
        add("table", "select", CANDIDATES[0], TARGET, candidates=CANDIDATES)
        for block in CANDIDATES:
            if block != BLOCK:
                add("alone", "kron", block, TARGET)
    return specs


def base_config(quick: bool, overrides: dict) -> TrainConfig:
    model = overrides.get("model", "vit")
    if model not in VIT_MODELS:
        raise ValueError(f"fashion-vit trains a vision transformer; --model must be one of {', '.join(VIT_MODELS)}")
    return TrainConfig(**{**RECIPE, "model": model, **(QUICK if quick else FULL), **overrides})


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process's run: CUDA's peak allocated bytes on a GPU; on CPU the process's
    peak resident set (a fresh worker per run, so the run's own: data and the torch runtime included)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    try:
        import resource
    except ImportError:  # not on this platform
        return {"peak_memory_bytes": None, "peak_memory_kind": None}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_memory_kind": "process_max_rss"}


def _run_one(spec: Spec, out: Path, threads: int | None) -> str:
    """Train one spec in this (fresh) worker and record its peak memory."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(spec.cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train(spec.cfg, out=out / "runs" / spec.name, progress=False)
    write_json(memory_file(out, spec.name), peak_memory(device))
    return spec.name


def run_plan(specs: list[Spec], out: Path, jobs: int) -> None:
    """Train every spec without a complete run, `jobs` at a time, each in a new process (spawned:
    safe with CUDA, and its peak RSS is the run's own) with one thread on CPU."""
    todo = [s for s in specs if rundir.finished_metrics(out / "runs" / s.name) is None]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", unit="run")
    threads = 1 if jobs > 1 else None
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as pool:
        for name in pool.map(_run_one, todo, [out] * len(todo), [threads] * len(todo)):
            bar.set_postfix_str(name)
            bar.update()
    bar.close()


def reproduce_vit(out: str | Path, seeds: list[int], quick: bool = False, jobs: int = 1,
                  overrides: dict | None = None) -> list[Spec]:
    """Run (or finish) the fashion-vit plan in `out`, then write its report there."""
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if not 1 <= jobs:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    check_at_most("jobs", jobs, "--jobs")
    base = base_config(quick, overrides or {})
    if base.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    specs = plan(seeds[:1] if quick else seeds, base)
    with rundir.open_folder(out) as folder:
        check_identity(specs, folder)
        run_plan(specs, folder, jobs)
        write_report(specs, folder)
    return specs

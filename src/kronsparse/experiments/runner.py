"""The one pipeline of `kronsparse reproduce`: check the folder, train every run of an experiment's
plan that is not finished yet, write the experiment's report.

Every run lives in DIR/runs/<name>/, a run folder of `kronsparse train` (training/run_folder.py): a
finished run is reused, so the command can be started again after an interruption, and a finished
run made with other settings is refused before anything trains.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_json
from ..limits import check_at_most
from ..training import run_folder
from ..training.train import resolve_device, train
from .common import Experiment, Spec, memory_file


def reproduce_experiment(experiment: Experiment, out: str | Path, seeds: list[int], quick: bool = False,
                         jobs: int = 1, overrides: dict | None = None) -> list[Spec]:
    """Run (or finish) the whole plan of `experiment` in `out`, then write its report there."""
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if not 1 <= jobs:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    check_at_most("jobs", jobs, "--jobs")
    base = experiment.base_config(quick, overrides or {})
    resolve_device(base.device)  # a device this machine lacks is refused before the folder is touched
    specs = experiment.plan(seeds[:1] if quick else seeds, quick, base)
    with run_folder.open_folder(out) as folder:
        check_identity(specs, folder)
        run_plan(specs, folder, jobs, experiment.fresh_process)
        experiment.write_report(specs, folder)
    return specs


def check_identity(specs: list[Spec], out: Path) -> None:
    """Refuse, before training anything, a folder whose finished runs were made with other settings
    (e.g. --epochs or --n-train): their results must never stand in for this plan's runs."""
    for spec in specs:
        done = run_folder.finished_metrics(out / "runs" / spec.name)
        if done is None or done["config"] == spec.cfg.to_dict():
            continue
        ours = spec.cfg.to_dict()
        diff = [f"{k} {done['config'].get(k)!r} there, {ours.get(k)!r} here"
                for k in sorted(set(ours) | set(done["config"])) if done["config"].get(k) != ours.get(k)]
        raise run_folder.RunFolderError(f"{out / 'runs' / spec.name} was made with other settings "
                                        f"({'; '.join(diff)}); use another --out, or delete its runs folder to redo them")


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------


def run_plan(specs: list[Spec], out: Path, jobs: int = 1, fresh_process: bool = False) -> None:
    """Train every spec whose folder holds no complete run yet, `jobs` at a time (one thread each
    when several); show which run of how many is going. `fresh_process`: each run in a new process
    (spawned: safe with CUDA, and its peak memory is the run's own), even with one job."""
    todo = [s for s in specs if run_folder.finished_metrics(out / "runs" / s.name) is None]
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", unit="run",
               disable=None)  # None: only on a terminal, not in a redirected log
    if jobs <= 1 and not fresh_process:
        for spec in todo:
            bar.set_postfix_str(spec.name)
            _run_one(spec, out, None, False)
            bar.update()
    else:
        fresh = {"mp_context": multiprocessing.get_context("spawn"), "max_tasks_per_child": 1} if fresh_process else {}
        n = len(todo)
        with ProcessPoolExecutor(jobs, initializer=_die_with_parent, initargs=(os.getpid(),), **fresh) as pool:
            for name in pool.map(_run_one, todo, [out] * n, [1 if jobs > 1 else None] * n, [fresh_process] * n):
                bar.set_postfix_str(name)
                bar.update()
    bar.close()


def _run_one(spec: Spec, out: Path, threads: int | None, record_memory: bool) -> str:
    """Train one spec (in this process or a worker); with `record_memory`, its peak memory too."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(spec.cfg.device)
    if record_memory and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train(spec.cfg, out=out / "runs" / spec.name, progress=False)
    if record_memory:
        write_json(memory_file(out, spec.name), peak_memory(device))
    return spec.name


def peak_memory(device: torch.device) -> dict:
    """Peak memory of this process's run: CUDA's peak allocated bytes on a GPU; on CPU the process's
    peak resident set (a fresh worker per run, so the run's own: data and the torch runtime included)."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda_allocated"}
    try:
        import resource  # POSIX only
    except ImportError:
        return {"peak_memory_bytes": None, "peak_memory_kind": None}
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale,
            "peak_memory_kind": "process_max_rss"}


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



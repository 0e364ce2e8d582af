"""The pipeline every experiment of `kronsparse reproduce` shares: plan, train, report.

An experiment (mnist.py, vit.py) is an `Experiment`: its base config, its plan (a list of `Spec`s)
and its report. Every run lives in DIR/runs/<name>/, a run folder of `kronsparse train`
(training/run_folder.py): a finished run is reused, so the command can be started again after an
interruption, and a finished run made with other settings is refused before anything trains. The
rest are the pieces the reports share: reading the runs back, mean and std over seeds, CSV, the
label of a method and the `kronsparse train` command that makes a run on its own.
"""

from __future__ import annotations

import csv
import ctypes
import io
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..atomic import write_json
from ..blocks import block_name
from ..limits import check_at_most
from ..methods import get_method
from ..training import run_folder
from ..training.config import TrainConfig, flag
from ..training.models import resolve_scale_pin
from ..training.train import train


@dataclass(frozen=True)
class Spec:
    """One run of the plan: its folder name, its config and the role it plays in the report."""

    name: str
    cfg: TrainConfig
    role: str  # e.g. "table", "sweep", "cost", "alone": what the report does with it


class Experiment:
    """What an experiment gives the pipeline: its base config, its plan and its report."""

    name: str
    fresh_process = False  # True: every run in a newly spawned process, its peak memory recorded

    def base_config(self, quick: bool, overrides: dict) -> TrainConfig:
        raise NotImplementedError

    def plan(self, seeds: list[int], quick: bool, base: TrainConfig) -> list[Spec]:
        raise NotImplementedError

    def write_report(self, specs: list[Spec], out: Path) -> None:
        raise NotImplementedError


def reproduce_experiment(experiment: Experiment, out: str | Path, seeds: list[int], quick: bool = False,
                         jobs: int = 1, overrides: dict | None = None) -> list[Spec]:
    """Run (or finish) the whole plan of `experiment` in `out`, then write its report there."""
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if not 1 <= jobs:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    check_at_most("jobs", jobs, "--jobs")
    base = experiment.base_config(quick, overrides or {})
    if base.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
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


def memory_file(out: Path, name: str) -> Path:
    """Where a run's peak memory is kept: beside the runs, not in them (metrics.json stays deterministic)."""
    return out / "memory" / f"{name}.json"


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


# --------------------------------------------------------------------------------------------
# What the reports share
# --------------------------------------------------------------------------------------------


def load_runs(specs: list[Spec], out: Path) -> list[dict]:
    """metrics.json of every spec, tagged with its role and its run's name."""
    return [{**run_folder.read_metrics(out / "runs" / spec.name), "role": spec.role, "run": spec.name}
            for spec in specs]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_csv(rows: list[dict]) -> str:
    """The rows as CSV, every key a column (in order of first appearance)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def holds(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def explicit_scale_pin(c: dict) -> str | None:
    """The scale pin of config `c` where it is not the one "auto" picks for its model, else None."""
    pin = c.get("scale_pin", "decay")  # configs written before "auto" existed say decay or norm
    return None if resolve_scale_pin(pin, c["model"]) == resolve_scale_pin("auto", c["model"]) else pin


def method_label(m: dict) -> str:
    """The method's table name: kron with the scale pin "auto" does not pick gets a row of its own."""
    pin = explicit_scale_pin(m["config"]) if m["method"] == "kron" else None
    return m["method"] + (f" (scale-pin {pin})" if pin else "")


def command_of(c: dict, recipe: tuple[str, ...] = ()) -> str:
    """The `kronsparse train` command that makes the run of config `c` on its own. `recipe`: the
    options an experiment sets for all its runs, always written (e.g. optimizer, lr, standardize)."""
    parts = ["kronsparse train", f"--method {c['method']}", f"--model {c['model']}", f"--dataset {c['dataset']}",
             f"--block {block_name(c['block_shape'])}", f"--rank {c['rank']}"]
    parts += [f"{flag(k)} {c[k]:g}" if isinstance(c[k], float) else f"{flag(k)} {c[k]}"
              for k in recipe if k != "standardize"]
    parts += [f"--epochs {c['epochs']}", f"--seed {c['seed']}"]
    if c.get("target_sparsity") is not None:
        parts.append(f"--target-sparsity {c['target_sparsity']:g}")
    if c.get("candidates"):
        parts.append("--candidates " + ",".join(block_name(b) for b in c["candidates"]))
    if not c.get("standardize", False):  # standardised inputs are the default
        parts.append("--no-standardize")
    elif "standardize" in recipe:
        parts.append("--standardize")
    if get_method(c["method"]).trains_factors and explicit_scale_pin(c):
        parts.append(f"--scale-pin {c['scale_pin']}")
    parts += [f"{flag(k)} {c[k]:g}" for k in ("lam", "factor_lr") if c.get(k) is not None]
    for key in ("n_train", "n_test"):
        if c.get(key):
            parts.append(f"{flag(key)} {c[key]}")
    if c.get("device", "cpu") != "cpu":
        parts.append(f"--device {c['device']}")
    return " ".join(parts) + " --out DIR"

"""Whole-model training steps: the method (KronLinear layers + its proximal step) against dense.

A script, not a test. One step is what `kronsparse train` runs per batch (`Run.train_step`):
forward, cross-entropy, backward, the optimizer step and the method's after-step work (for kron:
the scale pin, the l1 proximal step on S with lambda steering and the sparsity cap). The runs are
built as `kronsparse train` builds them, sparsifying (--target-sparsity), and stepped on the same
fixed MNIST batches, variants interleaved round-robin; the result is the median step time of each
and its ratio to dense in the same round.

    KRONSPARSE_DATA=../shared/data python benchmarks/bench_model_step.py --repeats 200

Prints a markdown table and writes benchmarks/results/model-step-<device>-<date>.json (or --out)
and the table beside it (.md). `--device cuda` runs the same on a GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import time_round_robin  # noqa: E402

from kronsparse.blocks import parse_block
from kronsparse.training.config import TrainConfig  # noqa: E402
from kronsparse.training.metrics import training_costs  # noqa: E402
from kronsparse.training.train import Run, load_data  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_run(method: str, model: str, block, rank: int, batch: int, device: str, ds) -> Run:
    target = None if method == "dense" else 0.6
    cfg = TrainConfig(method=method, model=model, block_shape=block, rank=rank, target_sparsity=target,
                      batch_size=batch, epochs=100, device=device, standardize=True)  # 100: all sparsifying
    return Run(cfg, ds, torch.device(device))


def start_at(run: Run, fraction: float) -> None:
    """Put the run at `fraction` of its training (the loop's and the method's step counters), so the
    timed steps are those of that phase: 0 is before the ramp (no order statistic taken), 0.3 is
    mid-ramp, where the "track" steering selects thresholds and caps every layer at every step."""
    run.step = run.sparsifier.steps = int(fraction * run.total_steps)


def train_step(run: Run, batches):
    """One `Run.train_step` per call, on the next of the fixed batches."""
    cycle = itertools.cycle(batches)
    return lambda: run.train_step(*next(cycle))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="linear,mlp")
    p.add_argument("--blocks", default="2x2,2x16")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--at", type=float, default=0.0,
                   help="time the steps from this fraction of training on (0: the first steps, before the ramp; "
                        "0.3: mid-ramp, the steering's order statistics every step)")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall time, or the CPU time of the (one) thread: on a machine other jobs share, the time the "
                        "scheduler gives them is left out (the caches they share are not)")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_data(TrainConfig(standardize=True), torch.device(args.device))
    batches = [(ds.x_train[i * args.batch:(i + 1) * args.batch], ds.y_train[i * args.batch:(i + 1) * args.batch])
               for i in range(50)]
    rows = []
    for model in args.models.split(","):
        for block in [parse_block(b) for b in args.blocks.split(",")]:
            runs = {m: make_run(m, model, block, args.rank, args.batch, args.device, ds) for m in ("dense", "kron")}
            for run in runs.values():
                start_at(run, args.at)
            steps = {name: train_step(run, batches) for name, run in runs.items()}
            times = time_round_robin(steps, args.repeats, args.warmup, args.device,
                                     time.thread_time if args.clock == "thread" else time.perf_counter)
            med = {k: statistics.median(v) for k, v in times.items()}
            paths = training_costs(runs["kron"].model, args.batch)["train_paths"]
            rows.append({"model": model, "block_shape": list(block), "rank": args.rank, "batch": args.batch, "at": args.at,
                         "dense_ms": med["dense"], "kron_ms": med["kron"], "kron_over_dense": med["kron"] / med["dense"],
                         "kron_paths": paths, "scale_pin": runs["kron"].method.pin,
                         "times_ms": {k: [round(t, 4) for t in v] for k, v in times.items()}})
            print(f"{model} {block}: dense {med['dense']:.3f} ms, kron {med['kron']:.3f} ms "
                  f"({med['kron'] / med['dense']:.2f}x, paths {paths})", flush=True)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "device": args.device, "threads": torch.get_num_threads(),
            "machine": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                        else platform.processor() or platform.machine()), "repeats": args.repeats,
            "warmup": args.warmup, "at": args.at, "clock": args.clock, "command": " ".join(sys.argv)}
    out = args.out or RESULTS / f"model-step-{args.device.split(':')[0]}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = ["| model | block | rank | batch | dense step | kron step | ratio | kron paths |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['model']} | {r['block_shape'][0]}x{r['block_shape'][1]} | {r['rank']} | {r['batch']} | "
                     f"{r['dense_ms']:.3f} ms | {r['kron_ms']:.3f} ms | {r['kron_over_dense']:.2f}x | "
                     f"{', '.join(r['kron_paths'])} |")
    print("\n" + "\n".join(table))
    phase = (f", from {args.at:.0%} of training on" if args.at else "") + (", thread CPU time" if args.clock == "thread" else "")
    out.with_suffix(".md").write_text(f"# Whole-model training step{phase}, {meta['machine']} ({args.device}), torch "
                                      f"{meta['torch']}, {meta['threads']} threads, {meta['date']}\n\nCommand: "
                                      f"`{meta['command']}`\n\n" + "\n".join(table) + "\n")
    print(f"\nwrote {out} and its .md")


if __name__ == "__main__":
    main()

"""Full MNIST epochs: kron (the method, sparsifying to 60%) against dense, as `kronsparse train` runs them.

Epochs of the two alternate, so that whatever else loads the machine loads both alike. Two modes:

- by default, the first `--repeats` epochs of a run planned for 100 (all of them before the ramp): the
  median epoch time of each and their ratio;
- with `--epochs E`, `--repeats` whole runs of E epochs (the ramp, the cap and the frozen masks
  included, in the share of steps a run of E epochs gives them): every epoch's time, and the median
  over runs of the total and its ratio. Wall time of the training steps (`epoch_seconds`: the
  evaluation after each epoch is left out).

    KRONSPARSE_DATA=../shared/data python benchmarks/epoch_time.py --repeats 5 --block 2x2 --rank 2
    KRONSPARSE_DATA=../shared/data python benchmarks/epoch_time.py --model mlp --epochs 5 --repeats 3 --threads 1
    KRONSPARSE_DATA=../shared/data python benchmarks/epoch_time.py --device cuda

Prints the JSON; with --out PATH.json also writes it there with a markdown summary beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout

from kronsparse.blocks import parse_block
from kronsparse.training.config import TrainConfig  # noqa: E402
from kronsparse.training.metrics import training_costs  # noqa: E402
from kronsparse.training.train import Run, load_data  # noqa: E402


def make_run(method: str, block, rank: int, target: float | None, ds, device: str = "cpu", model: str = "linear",
             epochs: int = 100) -> Run:
    cfg = TrainConfig(method=method, model=model, block_shape=block, rank=rank, target_sparsity=target, epochs=epochs,
                      device=device)
    return Run(cfg, ds, torch.device(device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="linear", help="linear or mlp (the paper's MNIST models)")
    p.add_argument("--block", default="2x2")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--epochs", type=int, default=None, help="time whole runs of this many epochs")
    p.add_argument("--repeats", type=int, default=5, help="epochs (default mode) or whole runs (--epochs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here and a .md beside it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    block = parse_block(args.block)
    ds = load_data(TrainConfig(), torch.device(args.device))

    def runs(epochs: int) -> dict[str, Run]:
        return {"dense": make_run("dense", block, args.rank, None, ds, args.device, args.model, epochs),
                "kron": make_run("kron", block, args.rank, 0.6, ds, args.device, args.model, epochs)}

    # default: one run planned for 100 epochs, its first `repeats` timed (all before the ramp);
    # --epochs E: `repeats` whole runs of E epochs
    planned, n_runs, timed = (100, 1, args.repeats) if args.epochs is None else (args.epochs, args.repeats, args.epochs)
    per_run: dict[str, list[list[float]]] = {"dense": [], "kron": []}
    for _ in range(n_runs):
        these = runs(planned)
        for name in these:
            per_run[name].append([])
        for _ in range(timed):
            for name, run in these.items():
                per_run[name][-1].append(run.train_epoch(progress=False)["epoch_seconds"])
    if args.epochs is None:
        times = {k: v[0] for k, v in per_run.items()}
        med = {k: statistics.median(v) for k, v in times.items()}
    else:
        times = per_run
        med = {k: statistics.median(sum(run) for run in v) for k, v in times.items()}
    result = {"model": args.model, "block_shape": list(block), "rank": args.rank, "epochs": args.epochs,
              "epoch_seconds": times, "median": med, "kron_over_dense": med["kron"] / med["dense"],
              "kron_train_paths": training_costs(these["kron"].model, 64)["train_paths"],
              "kron_last_epoch": {k: v for k, v in these["kron"].history[-1].items() if k.endswith(("accuracy", "sparsity"))},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
              or platform.machine(), "device": args.device, "date": date.today().isoformat(),
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
              "command": " ".join(["benchmarks/epoch_time.py", *(argv if argv is not None else sys.argv[1:])])}
    print(json.dumps(result, indent=2))
    if args.out is None:
        return
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(
        f"# {'Epoch' if args.epochs is None else f'Whole run ({args.epochs} epochs)'} time, "
        f"{result['device_name'] or result['machine']} ({args.device}), torch {result['torch']}, {result['threads']} "
        f"threads, {result['date']}\n\nCommand: `{result['command']}`\n\n"
        f"| model | block | rank | dense s | kron s | kron / dense | kron paths |\n|---|---|---|---|---|---|---|\n"
        f"| {args.model} | {args.block} | {args.rank} | {med['dense']:.3f} | {med['kron']:.3f} | "
        f"{result['kron_over_dense']:.2f} | {', '.join(result['kron_train_paths'])} |\n")


if __name__ == "__main__":
    main()

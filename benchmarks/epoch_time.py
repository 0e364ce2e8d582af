"""Full MNIST epochs of the linear model: kron (the method, sparsifying) against dense nn.Linear.

Epochs of the two alternate, so that whatever else loads the machine loads both alike; the result is
the median epoch time of each and their ratio. Usage:

    KRONSPARSE_DATA=../shared/data python benchmarks/epoch_time.py --repeats 5 --block 2x2 --rank 2
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


def make_run(method: str, block, rank: int, target: float | None, ds, device: str = "cpu") -> Run:
    cfg = TrainConfig(method=method, block_shape=block, rank=rank, target_sparsity=target, epochs=100, device=device)
    return Run(cfg, ds, torch.device(device))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", default="2x2")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here and a .md beside it")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    block = parse_block(args.block)
    ds = load_data(TrainConfig(), torch.device(args.device))
    runs = {"dense": make_run("dense", block, args.rank, None, ds, args.device),
            "kron": make_run("kron", block, args.rank, 0.6, ds, args.device)}  # 100 planned epochs: all sparsifying
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run.train_epoch(progress=False)["epoch_seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"block_shape": list(block), "rank": args.rank, "epoch_seconds": times, "median": med,
              "kron_over_dense": med["kron"] / med["dense"],
              "kron_train_paths": training_costs(runs["kron"].model, 64)["train_paths"],
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
              or platform.machine(), "device": args.device, "date": date.today().isoformat(),
              "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None}
    print(json.dumps(result, indent=2))
    if args.out is None:
        return
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(
        f"# Epoch time, {result['device_name'] or result['machine']} ({args.device}), torch {result['torch']}, "
        f"{result['threads']} threads, {result['date']}\n\n| block | rank | dense s | kron s | kron / dense | kron paths |\n"
        f"|---|---|---|---|---|---|\n| {args.block} | {args.rank} | {med['dense']:.3f} | {med['kron']:.3f} | "
        f"{result['kron_over_dense']:.2f} | {', '.join(result['kron_train_paths'])} |\n")


if __name__ == "__main__":
    main()

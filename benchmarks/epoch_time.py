"""Full MNIST epochs of the linear model: kron (the method, sparsifying) against dense nn.Linear.

Epochs of the two alternate, so that whatever else loads the machine loads both alike; the result is
the median epoch time of each and their ratio. Usage:

    KRONSPARSE_DATA=../shared/data python benchmarks/epoch_time.py --repeats 5 --block 2x2 --rank 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from datetime import date

import torch

from kronsparse.config import TrainConfig, parse_block
from kronsparse.metrics import training_costs
from kronsparse.train import Run, load_data


def make_run(method: str, block, rank: int, target: float | None, ds) -> Run:
    cfg = TrainConfig(method=method, block_shape=block, rank=rank, target_sparsity=target, epochs=100)
    return Run(cfg, ds, torch.device("cpu"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", default="2x2")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    block = parse_block(args.block)
    ds = load_data(TrainConfig(), torch.device("cpu"))
    runs = {"dense": make_run("dense", block, args.rank, None, ds),
            "kron": make_run("kron", block, args.rank, 0.6, ds)}  # 100 planned epochs: all sparsifying
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run.train_epoch(progress=False)["epoch_seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"block_shape": list(block), "rank": args.rank, "epoch_seconds": times, "median": med,
              "kron_over_dense": med["kron"] / med["dense"],
              "kron_train_paths": training_costs(runs["kron"].model, 64)["train_paths"],
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor()
              or platform.machine(), "date": date.today().isoformat()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

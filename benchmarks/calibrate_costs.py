"""Calibrate the constants of kronsparse.costs.step_cost from measured forward + backward times.

    python benchmarks/calibrate_costs.py measure --out benchmarks/results/calibration-cpu.json
    python benchmarks/calibrate_costs.py fit benchmarks/results/calibration-cpu.json

`measure` times forward + backward (input with and without requires_grad) of every factored path
and dense, interleaved round-robin, over a grid of layers. `fit` grid-searches _BMM_COST,
_COPY_COST and _LAUNCH_COST for the smallest total slowdown of the chosen path against the fastest
measured one, prints the winner and every case the chooser still gets wrong.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import make_step, time_round_robin  # noqa: E402

from kronsparse import KronLinear, costs  # noqa: E402

PATHS = ("input_first", "factors_first", "materialize")


def default_grid() -> list[tuple]:
    """(in, out, block_shape, rank, batch) cases: the MNIST layer and 1024x1024."""
    grid = [(784, 10, blk, r, n) for blk in [(2, 2), (2, 16)] for r in (1, 2, 4) for n in (64, 512, 4096)]
    grid += [(1024, 1024, blk, r, n) for blk in [(4, 4), (16, 16), (64, 64)] for r in (1, 2, 4)
             for n in (64, 512, 2048)]
    return grid + [(2048, 2048, (16, 16), 2, 512)]


def measure_case(case, need_x: bool, repeats: int, device: str = "cpu") -> dict:
    """Median forward + backward ms of dense and each path on one case."""
    i, o, blk, r, n = case
    x = torch.randn(n, i, device=device, requires_grad=need_x)
    gy = torch.randn(n, o, device=device)
    mods = {"dense": nn.Linear(i, o, device=device)} | {p: KronLinear(i, o, blk, r, path=p, device=device)
                                                      for p in PATHS}
    steps = {k: make_step(m, torch.optim.SGD(m.parameters(), lr=0.01), None, x, gy, "fb") for k, m in mods.items()}
    times = time_round_robin(steps, repeats, 2, device)
    return {"in": i, "out": o, "block": list(blk), "rank": r, "batch": n, "need_x": need_x,
            **{k: statistics.median(v) for k, v in times.items()}}


def measure(out: Path, repeats: int, device: str = "cpu") -> None:
    rows = []
    for case in default_grid():
        for need_x in (True, False):
            reps = repeats if case[0] * case[1] * case[4] < 1e8 else max(3, repeats // 6)
            rows.append(measure_case(case, need_x, reps, device))
            print(rows[-1], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or platform.machine()
    out.write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
                               "device_name": name, "date": dt.datetime.now().isoformat(timespec="seconds"),
                               "rows": rows}, indent=1))


def slowdown(rows: list[dict]) -> tuple[float, list[str]]:
    """Sum over cases of time(chosen)/time(fastest) - 1 under the current constants, and the misses."""
    total, misses = 0.0, []
    for row in rows:
        chosen = costs.choose_path(row["in"], row["out"], tuple(row["block"]), row["rank"], row["batch"],
                                   True, row["need_x"])
        best = min(PATHS, key=row.get)
        total += row[chosen] / row[best] - 1
        if chosen != best:
            misses.append(f"{row['in']}x{row['out']} {row['block']} r{row['rank']} N{row['batch']} x_grad="
                          f"{row['need_x']}: chose {chosen} {row[chosen]:.2f} ms, best {best} {row[best]:.2f} ms")
    return total, misses


def set_constants(bmm: float, copy: float, launch: float) -> None:
    costs._BMM_COST, costs._COPY_COST, costs._LAUNCH_COST = bmm, copy, launch
    costs._choose_path.cache_clear()


def fit(path: Path) -> None:
    rows = json.loads(path.read_text())["rows"]
    grid = itertools.product((1, 1.5, 2, 3, 4, 6, 8), (1, 2, 4, 8, 16, 32),
                             (5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6))
    best = min(grid, key=lambda c: (set_constants(*c), slowdown(rows)[0])[1])
    set_constants(*best)
    total, misses = slowdown(rows)
    print(f"best _BMM_COST={best[0]} _COPY_COST={best[1]} _LAUNCH_COST={best[2]:.0f}: "
          f"summed slowdown {total:.2f} over {len(rows)} cases, {len(misses)} misses")
    print("\n".join(misses))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration-cpu.json")
    m.add_argument("--repeats", type=int, default=30)
    m.add_argument("--device", default="cpu")
    f = sub.add_parser("fit")
    f.add_argument("json", type=Path)
    args = p.parse_args(argv)
    measure(args.out, args.repeats, args.device) if args.cmd == "measure" else fit(args.json)


if __name__ == "__main__":
    main()

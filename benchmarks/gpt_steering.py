"""Which steering on the language model? kron at 8x8 and 16x16 on the full pycode-gpt setting, with
the penalty steered by order statistics (`track`, the default), with the steering before it
(`legacy`) and without a penalty (`prune`: gradual magnitude pruning of S), three seeds each.

A script, not a test. The `legacy` and `prune` runs are `kronsparse train` runs with the settings of
`kronsparse reproduce pycode-gpt` (width 128, 4 blocks, 4 heads, context 128, AdamW 1e-3, 16
sequences a step, 16,000 training windows, rank 4, 50% of blocks) and `--steering`, one process per
run, one thread each; a run whose metrics.json is there is not run again. The `track` rows are that
reproduction's own (the same settings): read from its table.csv, not trained twice.

    KRONSPARSE_DATA=../shared/data python benchmarks/gpt_steering.py --jobs 2 \
        --out results/pycode-gpt-steering --full results/pycode-gpt-full

Writes OUT/<run>/ (config.json, metrics.json, manifest.json; the weights are not committed) and OUT/table.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCKS = ("8x8", "16x16")
STEERINGS = ("legacy", "prune")
SETTINGS = ["--method", "kron", "--model", "gpt", "--dataset", "pycode", "--rank", "4", "--target-sparsity", "0.5",
            "--optimizer", "adamw", "--lr", "0.001", "--batch-size", "16", "--epochs", "1", "--n-train", "16000",
            "--width", "128", "--layers", "4", "--heads", "4", "--context", "128", "--threads", "1", "--no-progress"]


def run_name(block: str, steering: str, seed: int) -> str:
    return f"kron-{block}-r4-{steering}-s{seed}"


def train(out: Path, block: str, steering: str, seed: int) -> None:
    folder = out / run_name(block, steering, seed)
    if (folder / "metrics.json").exists():
        return
    cmd = [sys.executable, "-m", "kronsparse", "train", *SETTINGS, "--block", block, "--steering", steering,
           "--seed", str(seed), "--out", str(folder)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    print(f"{folder.name}: done", flush=True)


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def table(out: Path, full: Path, seeds: list[int]) -> str:
    lines = ["| block | steering | seeds | test bpb | val bpb | zero blocks from top-up % |", "|---|---|---|---|---|---|"]
    tracked = {(r["method"], r["block"]): r for r in csv.DictReader((full / "table.csv").open())}
    for block in BLOCKS:
        r = tracked[("kron", block)]
        pm = lambda key: f"{float(r[key]):.3f}" + (f" ± {float(r[key + '_std']):.3f}" if int(r["seeds"]) > 1 else "")  # noqa: E731
        lines.append(f"| {block} | track (default) | {r['seeds']} | {pm('test_bpb')} | {pm('val_bpb')} | "
                     f"{100 * float(r['topped_up_fraction']):.1f} |")
        for steering in STEERINGS:
            ms = [json.loads((out / run_name(block, steering, s) / "metrics.json").read_text()) for s in seeds]
            topup = statistics.mean(m["topped_up_blocks"] / m["zero_blocks"] for m in ms)
            lines.append(f"| {block} | {steering} | {len(ms)} | {cell([m['test_bpb'] for m in ms])} | "
                         f"{cell([m['val_bpb'] for m in ms])} | {100 * topup:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("results/pycode-gpt-steering"))
    p.add_argument("--full", type=Path, default=Path("results/pycode-gpt-full"),
                   help="the full reproduction's folder, for the track rows")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(b, st, s) for s in seeds for st in STEERINGS for b in BLOCKS]
    with ThreadPoolExecutor(args.jobs) as pool:  # each run its own process
        list(pool.map(lambda job: train(args.out, *job), jobs))
    text = table(args.out, args.full, seeds)
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Why 2 threads crawl on a shared 2-core machine: one short kron training run per setting, each in a
fresh process (OpenMP reads its environment once), settings interleaved, optionally beside busy
processes that stand in for other users' jobs.

    KRONSPARSE_DATA=../shared/data python benchmarks/threads_shared.py --busy 1 --repeats 3

Prints, per setting, the median wall time and the process's CPU time (user + sys): a CPU time far
above the wall time of one thread's work is OpenMP threads spin-waiting at barriers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SETTINGS = {
    "threads 1": ({}, 1, None),
    "threads 2": ({}, 2, None),
    "threads 2, OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2, None),
    "threads 2, OMP_WAIT_POLICY=ACTIVE": ({"OMP_WAIT_POLICY": "ACTIVE"}, 2, None),
    "threads 2, interop threads 1": ({}, 2, 1),
}

CHILD = """
import json, resource, sys, time, torch
from kronsparse.training.config import TrainConfig
from kronsparse.training.train import train
threads, interop, n_train, model = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
if interop != "None":
    torch.set_num_interop_threads(int(interop))
cfg = TrainConfig(model=model, block_shape=(2, 2), rank=2, target_sparsity=0.6, epochs=1, n_train=n_train,
                  n_test=1000, threads=threads, standardize=True)
train(cfg, progress=False)  # warm: data cached in this process, kernels loaded
t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
m = train(cfg, progress=False)
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": time.perf_counter() - t0, "cpu": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
                  "acc": m["test_accuracy"]}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busy", type=int, default=1, help="busy-loop processes running alongside")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-train", type=int, default=12800)
    p.add_argument("--model", default="linear")
    p.add_argument("--only", default=None, help="comma-separated setting numbers (0-based) to run")
    args = p.parse_args()
    settings = list(SETTINGS.items())
    if args.only:
        settings = [settings[int(i)] for i in args.only.split(",")]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    results: dict[str, list[dict]] = {name: [] for name, _ in settings}
    try:
        for _ in range(args.repeats):
            for name, (env, threads, interop) in settings:
                out = subprocess.run([sys.executable, "-c", CHILD, str(threads), str(interop), str(args.n_train),
                                      args.model], env={**os.environ, **env}, capture_output=True, text=True,
                                     check=True)
                results[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(name, results[name][-1], f"load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for b in busy:
            b.kill()
    print(f"\n{args.model}, {args.n_train} samples, 1 epoch, {args.busy} busy process(es), median of {args.repeats}:")
    print("| setting | wall s | CPU s |")
    print("|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {statistics.median(r['wall'] for r in rs):.2f} | "
              f"{statistics.median(r['cpu'] for r in rs):.2f} |")


if __name__ == "__main__":
    main()

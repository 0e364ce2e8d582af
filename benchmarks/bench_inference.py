"""Inference of a block-sparse layer: BlockSparseLinear (auto, and each representation) against dense.

A script, not a test. A (out, in) layer whose Kronecker factors keep a fraction of the (bo, bi)
blocks (S zero elsewhere), at each row count: the median time of one forward (torch.no_grad) of
dense nn.functional.linear and of BlockSparseLinear with each representation and with "auto" (what
it picks for that row count), interleaved round-robin, and the ratio to dense of the same rounds.

    python benchmarks/bench_inference.py --threads 1
    python benchmarks/bench_inference.py --device cuda

Writes benchmarks/results/inference-<device>-<date>.json and .md (or --out STEM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_step import time_round_robin  # noqa: E402

from kronsparse.functional import kron_weight  # noqa: E402
from kronsparse.inference import BlockSparseLinear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def make_layer(i: int, o: int, block, rank: int, keep: float, device):
    """Factors with a random `keep` fraction of S's entries non-zero, and the dense W they make."""
    g = torch.Generator().manual_seed(0)
    bo, bi = block
    m1, n1 = o // bo, i // bi
    S = torch.randn(m1, n1, generator=g) * (torch.rand(m1, n1, generator=g) < keep)
    A, B = torch.randn(rank, m1, n1, generator=g), torch.randn(rank, bo, bi, generator=g) / (bi * n1 * keep) ** 0.5
    factors = {k: v.to(device) for k, v in (("S", S), ("A", A), ("B", B))}
    return kron_weight(*factors.values()), torch.randn(o, generator=g).to(device), factors


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="4096x4096", help="in x out")
    p.add_argument("--block", default="16x16")
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.9, help="fraction of blocks that are zero")
    p.add_argument("--rows", default="1,64,1024")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    i, o = (int(v) for v in args.size.split("x"))
    block = tuple(int(v) for v in args.block.split("x"))
    W, bias, factors = make_layer(i, o, block, args.rank, 1 - args.sparsity, args.device)
    reps = ("dense", "bsr", "input_first", "factors_first")
    layers = {r: BlockSparseLinear(W, bias, block, factors, representation=r) for r in reps}
    layers["auto"] = BlockSparseLinear(W, bias, block, factors)
    rows = []
    for n in (int(v) for v in args.rows.split(",")):
        x = torch.randn(n, i, device=args.device)
        with torch.no_grad():
            ref = nnf.linear(x, W, bias)
            for name, layer in layers.items():
                torch.testing.assert_close(layer(x), ref, rtol=1e-3, atol=1e-3)
            steps = {"torch dense": lambda: nnf.linear(x, W, bias)} | {k: (lambda m=m: m(x)) for k, m in layers.items()}
            times = time_round_robin(steps, args.repeats, args.warmup, args.device)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"rows": n, "median_ms": med, "speedup_vs_dense": {k: med["torch dense"] / v for k, v in med.items()},
                     "auto_choice": layers["auto"].choice[n], "times_ms": times})
        print(f"rows {n}: dense {med['torch dense']:.3f} ms, auto ({layers['auto'].choice[n]}) {med['auto']:.3f} ms "
              f"= {med['torch dense'] / med['auto']:.2f}x faster; "
              + ", ".join(f"{k} {med['torch dense'] / med[k]:.2f}x" for k in reps), flush=True)
    dev = torch.device(args.device)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__, "device": args.device,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "size": args.size, "block": args.block, "rank": args.rank,
            "sparsity": args.sparsity, "repeats": args.repeats, "command": " ".join(sys.argv)}
    stem = Path(args.out) if args.out else RESULTS / f"inference-{dev.type}-{dt.date.today()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = (f"# Block-sparse inference, {meta['device_name']} ({args.device}), {meta['threads']} threads, torch "
            f"{meta['torch']}, {meta['date']}\n\n{args.size}, {args.block} blocks, {args.sparsity:.0%} of them zero, "
            f"rank {args.rank}. Command: `{meta['command']}`. Median of {args.repeats}, interleaved; speed-up = dense "
            "time / time.\n\n| rows | dense ms | auto picks | auto ms | auto speed-up | " + " | ".join(reps[1:]) + " |\n|"
            + "---|" * (5 + len(reps) - 1) + "\n")
    body = "".join(f"| {r['rows']} | {r['median_ms']['torch dense']:.3f} | {r['auto_choice']} | {r['median_ms']['auto']:.3f} | "
                   f"{r['speedup_vs_dense']['auto']:.2f}x | " + " | ".join(f"{r['speedup_vs_dense'][k]:.2f}x" for k in reps[1:])
                   + " |\n" for r in rows)
    stem.with_suffix(".md").write_text(head + body)
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

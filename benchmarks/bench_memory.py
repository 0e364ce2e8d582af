"""Peak training memory (forward + backward) of KronLinear's paths against dense nn.Linear.

A script, not a test. For each layer and each input case (leaf: the input is a leaf that needs a
gradient; mid: it is made by an op before the layer, x * 1.0; no_grad: it needs none) it counts the
bytes one forward + backward allocates on top of what exists before it (parameters, the input, the
upstream gradient): on CPU from torch.profiler's allocation events, on CUDA from
torch.cuda.max_memory_allocated (benchmarks/memory.py). Beside each measurement: the memory model
(kronsparse.costs.train_peak_bytes), the ratio to dense's peak, and the peak with the parameters
counted (dense's weight is W-sized, the factors are not). Counts bytes; times nothing.

    python benchmarks/bench_memory.py                 # the default layers, CPU
    python benchmarks/bench_memory.py --device cuda   # the same on a GPU

Writes benchmarks/results/memory-<device>-<date>.json and .md (or --out STEM).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import fb_peak_bytes  # noqa: E402

from kronsparse import KronLinear, costs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("leaf", "mid", "no_grad")
VARIANTS = ("dense", "input_first", "factors_first", "materialize", "auto")
DEFAULT = ("4096x4096:16x16:1:4096,2048x2048:16x16:2:512,1024x1024:4x4:2:1024,"
           "784x300:2x16:2:64,784x10:2x2:2:64")


class _Mid(nn.Module):
    def forward(self, x):
        return x * 1.0


def parse_cases(text: str) -> list[tuple]:
    """'in x out : bo x bi : rank : rows, ...' -> (in, out, (bo, bi), rank, rows)."""
    out = []
    for item in text.split(","):
        size, block, rank, rows = item.split(":")
        i, o = (int(v) for v in size.lower().split("x"))
        bo, bi = (int(v) for v in block.lower().split("x"))
        out.append((i, o, (bo, bi), int(rank), int(rows)))
    return out


def measure(layer: nn.Module, x0: torch.Tensor, gy: torch.Tensor, case: str, device) -> int:
    return fb_peak_bytes(nn.Sequential(_Mid() if case == "mid" else nn.Identity(), layer), x0, gy, device)


def model_bytes(i, o, block, r, n, variant: str, case: str) -> int:
    """costs' prediction; mid adds what both hold for the op before the layer (its output x * 1.0;
    the layer's gx is freed as x's own gradient is made)."""
    need_x, extra = case != "no_grad", (n * i * 4 if case == "mid" else 0)
    if variant == "dense":
        return costs.dense_train_peak_bytes(i, o, n, need_x) + extra
    path = costs.choose_path(i, o, block, r, n, True, need_x) if variant == "auto" else variant
    return costs.train_peak_bytes(i, o, block, r, n, path, need_x) + extra


def run(args) -> list[dict]:
    rows = []
    for i, o, block, r, n in parse_cases(args.cases):
        for case in CASES:
            torch.manual_seed(0)
            x0 = torch.randn(n, i, device=args.device, requires_grad=case != "no_grad")
            gy = torch.randn(n, o, device=args.device)
            dense_peak = None
            for variant in VARIANTS:
                layer = (nn.Linear(i, o) if variant == "dense" else KronLinear(i, o, block, r, path=variant)).to(args.device)
                params = sum(p.numel() * p.element_size() for p in layer.parameters())
                peak = measure(layer, x0, gy, case, args.device)
                dense_peak = peak if variant == "dense" else dense_peak
                dense_params = 4 * (i * o + o)
                path = variant if variant != "auto" else costs.choose_path(i, o, block, r, n, True, case != "no_grad")
                rows.append({"in": i, "out": o, "block": list(block), "rank": r, "rows": n, "case": case,
                             "variant": variant, "path": path if variant != "dense" else "dense", "peak_bytes": peak,
                             "model_bytes": model_bytes(i, o, block, r, n, variant, case),
                             "ratio_vs_dense": round(peak / dense_peak, 4), "param_bytes": params,
                             "ratio_with_params": round((peak + params) / (dense_peak + dense_params), 4)})
                del layer
            auto = rows[-1]
            print(f"{i}x{o} {block} r{r} N{n} {case}: dense {dense_peak / 2**20:.1f} MiB, auto ({auto['path']}) "
                  f"{auto['peak_bytes'] / 2**20:.1f} MiB ({auto['ratio_vs_dense']:.2f}x)", flush=True)
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    head = (f"# Peak training memory, {meta['device_name']} ({meta['device']}), fp32, torch {meta['torch']}, "
            f"{meta['date']}\n\nCommand: `{meta['command']}`. Bytes one forward + backward allocates on top of "
            "the parameters, the input and the upstream gradient (CPU: torch.profiler allocation events; CUDA: "
            "max_memory_allocated). model = kronsparse.costs.train_peak_bytes. with params = (peak + the layer's "
            "parameters) / (dense's peak + dense's parameters).\n\n")
    cols = ("in x out", "block", "r", "rows", "input", "variant", "path", "peak MiB", "model MiB", "x dense",
            "x dense with params")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(v) for v in (
            f"{r['in']}x{r['out']}", f"{r['block'][0]}x{r['block'][1]}", r["rank"], r["rows"], r["case"], r["variant"],
            r["path"], f"{r['peak_bytes'] / 2**20:.2f}", f"{r['model_bytes'] / 2**20:.2f}", f"{r['ratio_vs_dense']:.2f}",
            f"{r['ratio_with_params']:.2f}")) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT, help="'in x out:bo x bi:rank:rows,...'")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/memory-<device>-<date>)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__, "device": args.device,
            "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                            else (platform.processor() or platform.machine())),
            "command": " ".join(sys.argv)}
    rows = run(args)
    stem = Path(args.out) if args.out else RESULTS / f"memory-{dev.type}-{dt.date.today()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

"""Pattern selection in one run against every candidate block shape trained separately (kron method).

Trains, at the same target sparsity, seed and epochs: one `select` run over all candidates, then one
`kron` run per candidate. Writes OUT/summary.json and OUT/summary.md (plus each run's own folder)
and prints the markdown. The claim checked: the selected shape's accuracy is within 0.5 points of
the best separately trained candidate, and the selection run costs less wall time than all the
separate runs together.

    KRONSPARSE_DATA=../shared/data python benchmarks/selection_vs_separate.py \
        --candidates 2x2,2x4,2x8,2x16 --epochs 10 --seed 0 --target-sparsity 0.5 --threads 1 \
        --out results/selection_vs_separate
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from kronsparse.blocks import parse_block
from kronsparse.training.config import TrainConfig
from kronsparse.training.train import train

TOLERANCE = 0.005  # accuracy, as a fraction


def run_all(args) -> dict:
    candidates = tuple(parse_block(t) for t in args.candidates.split(","))
    common = dict(model=args.model, rank=args.rank, target_sparsity=args.target_sparsity, epochs=args.epochs,
                  seed=args.seed, threads=args.threads, n_train=args.n_train, n_test=args.n_test,
                  standardize=False, device=args.device)  # raw pixels, as the README's table of this benchmark was measured
    out = Path(args.out)
    sel = train(TrainConfig(method="select", candidates=candidates, **common), out / "select", progress=False)
    print(f"select: {sel['selected_block_shape']} acc {sel['test_accuracy']:.4f} in {sel['wall_seconds']:.1f}s",
          flush=True)
    separate = {}
    for bo, bi in candidates:
        m = train(TrainConfig(method="kron", block_shape=(bo, bi), **common), out / f"kron_{bo}x{bi}", progress=False)
        separate[f"{bo}x{bi}"] = {k: m[k] for k in ("test_accuracy", "block_sparsity", "wall_seconds",
                                                     "train_params")}
        print(f"kron {bo}x{bi}: acc {m['test_accuracy']:.4f} in {m['wall_seconds']:.1f}s", flush=True)
    best = max(separate, key=lambda k: separate[k]["test_accuracy"])
    chosen = "x".join(str(v) for v in sel["selected_block_shape"])
    separate_wall = sum(v["wall_seconds"] for v in separate.values())
    return {
        "command_config": {**common, "candidates": args.candidates},
        "selection": {k: sel[k] for k in ("selected_block_shape", "selected_at_step", "selection_forced",
                                          "removed_at_step", "selection_rule", "test_accuracy", "block_sparsity",
                                          "wall_seconds", "train_params", "selection_train_params",
                                          "group_norms", "weight_norms", "group_lambda")},
        "separate": separate,
        "best_separate": best,
        "accuracy_gap_points": 100 * (separate[best]["test_accuracy"] - sel["test_accuracy"]),
        "selected_separate_accuracy": separate[chosen]["test_accuracy"],
        "within_tolerance": sel["test_accuracy"] >= separate[best]["test_accuracy"] - TOLERANCE,
        "separate_wall_seconds": separate_wall,
        "wall_ratio": sel["wall_seconds"] / separate_wall,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "device": args.device,
                    "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
    }


def markdown(s: dict) -> str:
    sel = s["selection"]
    chosen = "x".join(str(v) for v in sel["selected_block_shape"])
    rows = ["| run | block (out x in) | paper name | test accuracy | block sparsity | train params | wall s |",
            "|---|---|---|---|---|---|---|",
            f"| select (one run) | {chosen} | {chosen.split('x')[1]}x{chosen.split('x')[0]} | "
            f"{sel['test_accuracy']:.4f} | {sel['block_sparsity']:.3f} | {sel['selection_train_params']} -> "
            f"{sel['train_params']} | {sel['wall_seconds']:.1f} |"]
    for name, r in s["separate"].items():
        bo, bi = name.split("x")
        mark = " (best)" if name == s["best_separate"] else ""
        rows.append(f"| kron{mark} | {name} | {bi}x{bo} | {r['test_accuracy']:.4f} | {r['block_sparsity']:.3f} | "
                    f"{r['train_params']} | {r['wall_seconds']:.1f} |")
    rows += ["", f"Selected {chosen} at step {sel['selected_at_step']} "
             f"({'forced by the rule' if sel['selection_forced'] else 'the group lasso left one candidate'}); "
             f"accuracy gap to the best separate run: {s['accuracy_gap_points']:+.2f} points "
             f"({'within' if s['within_tolerance'] else 'NOT within'} 0.5); "
             f"wall time {sel['wall_seconds']:.1f}s vs {s['separate_wall_seconds']:.1f}s for all separate runs "
             f"(ratio {s['wall_ratio']:.2f}).",
             f"Config: {json.dumps(s['command_config'])}. Machine: {s['machine']['platform']}, "
             f"torch {s['machine']['torch']}, {s['machine']['threads']} thread(s)."]
    return "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", default="2x2,2x4,2x8,2x16")
    p.add_argument("--model", default="linear")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--target-sparsity", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--out", default="results/selection_vs_separate")
    args = p.parse_args()
    summary = run_all(args)
    out = Path(args.out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = markdown(summary)
    (out / "summary.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""How much of a kron run's pruning the steered proximal step does, and how much the final top-up
does, under SGD, Adam and AdamW, with the default steering ("track") and the one before it
("legacy"), in runs of 200 and 3,000 steps (the same toy as tests/test_sparsifier.py).

    python benchmarks/steering_optimizers.py   # writes results/steering-optimizers/result.json
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from kronsparse import Sparsifier

OUT = Path(__file__).resolve().parents[1] / "results" / "steering-optimizers" / "result.json"
OPTIMIZERS = {"sgd": lambda sp: sp.optimizer(torch.optim.SGD, lr=0.05, momentum=0.9),
              "adam": lambda sp: sp.optimizer(torch.optim.Adam, lr=1e-3),
              "adamw": lambda sp: sp.optimizer(torch.optim.AdamW, lr=3e-3)}


def run(name: str, steps: int = 3000, target: float = 0.5, steering: str = "track") -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 16, generator=g)
    y = (x @ torch.randn(3, 16, generator=g).t()).argmax(1)
    sp = Sparsifier(model, "kron", block_shape=(4, 4), rank=2, target_sparsity=target, total_steps=steps,
                    steering=steering)
    opt = OPTIMIZERS[name](sp)  # the factors at 8x the lr under Adam and AdamW
    for step in range(steps):
        batch = slice(16 * (step % 4), 16 * (step % 4 + 1))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
        sp.step(opt)
    with warnings.catch_warnings():  # the legacy steering's short runs warn that the top-up did it
        warnings.simplefilter("ignore")
        sp.finalize()
    zero = sum(round(s * 32) for s in sp.layer_sparsity().values())
    return {"optimizer": name, "steering": steering, "steps": steps, "factor_lr": sp.summary()["factor_lr"],
            "zero_blocks": zero, "topped_up_blocks": sp.method.topped_up,
            "by_the_prox": zero - sp.method.topped_up, "final_lambda": sp.summary()["final_lambda"],
            "layer_sparsity": sp.layer_sparsity()}


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    rows = [run(name, steps, steering=steering) for steering in ("track", "legacy") for steps in (200, 3000)
            for name in OPTIMIZERS]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                               "blocks": 64, "target": 0.5, "seconds": round(time.time() - start, 1),
                               "runs": rows}, indent=2) + "\n")
    for r in rows:
        print(f"{r['steering']:6s} {r['steps']:5d} steps {r['optimizer']:6s} zero blocks {r['zero_blocks']} of 64, "
              f"topped up {r['topped_up_blocks']}")


if __name__ == "__main__":
    main()

"""The accuracy gap of the kron method on the ViT (issue 16): every variant tried, one worker process
per run, one thread each. A variant is the fashion-vit quick setting (3 epochs on the first 20,000
Fashion-MNIST training images, AdamW 1e-3, batch 128, 4x4 blocks, rank 4, 50% target) unless its
name says otherwise: full- (10 epochs on all 60,000 images), wide- (hidden 192, MLP 768, 3 heads),
mnist- (the README's MNIST linear model under SGD), adam- and sgd- (MNIST MLP and LeNet-5, 2
epochs, under Adam or SGD; mlp10: 10 epochs; sgd05: SGD at lr 0.05). Variants that are not library
options (the ramp as a floor) patch the method in their own worker.

    KRONSPARSE_DATA=../shared/data python benchmarks/vit_variants.py --out results/vit-variants \
        --seeds 0,1,2 --jobs 2 VARIANT [VARIANT ...]

Each finished run appends one line to OUT/runs.jsonl (variant, seed, accuracy, block sparsity, the
variant's settings); runs already there are skipped, so the command can be repeated with more
variants or seeds. `--list` prints the variants. OUT/table.md is rewritten from runs.jsonl.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

QUICK = {"model": "vit", "dataset": "fashion-mnist", "optimizer": "adamw", "lr": 1e-3, "batch_size": 128,
         "standardize": True, "epochs": 3, "n_train": 20_000, "block_shape": (4, 4), "rank": 4}
# the MNIST linear model as in the README's tables (SGD 0.01, momentum 0.9, batch 64, 10 epochs)
MNIST = {"model": "linear", "dataset": "mnist", "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "batch_size": 64,
         "standardize": True, "epochs": 10}
SPARSE = {"method": "kron", "target_sparsity": 0.5}
NONE = {"method": "kron", "target_sparsity": None}

# name -> (TrainConfig overrides, what the variant changes in words); "x1" is the factor lr before
# issue 16 (the optimizer's own), the default now resolves to x8 under AdamW
X1 = {"factor_lr": 1.0}
VARIANTS: dict[str, tuple[dict, str]] = {
    "dense": ({"method": "dense"}, "dense W, the ceiling"),
    "dense-lr4e-3": ({"method": "dense", "lr": 4e-3}, "dense W at 4x the lr: is the recipe's lr too low for dense too?"),
    "block-magnitude": ({"method": "block-magnitude", "target_sparsity": 0.5}, "gradual block magnitude pruning"),
    "kron": (SPARSE, "the method's defaults (factors at 8x the lr under AdamW)"),
    "kron-nosparse": (NONE, "the defaults, no penalty"),
    "kron-nosparse-lr1": ({**NONE, **X1}, "Kronecker factors at the optimizer's lr, no penalty: the parametrisation alone"),
    "kron-nosparse-r16-lr1": ({**NONE, **X1, "rank": 16}, "full rank (16 = bo*bi, can express any W), x1, no penalty"),
    "kron-floor-lr1": ({**SPARSE, **X1, "_floor": True},
                       "x1; the ramp is also a floor: every 10 steps, blocks of smallest norm pruned up to it"),
}
for _k in (1.0, 2.0, 4.0, 8.0, 16.0):
    VARIANTS[f"kron-lr{_k:g}"] = ({**SPARSE, "factor_lr": _k}, f"factors (A, B, S) at {_k:g}x the lr"
                                  + (" (the method before the factor lr)" if _k == 1.0 else ""))
    if _k != 1.0:
        VARIANTS[f"kron-nosparse-lr{_k:g}"] = ({**NONE, "factor_lr": _k}, f"factors at {_k:g}x the lr, no penalty")
for _k in (4.0, 8.0):
    VARIANTS[f"kron-floor-lr{_k:g}"] = ({**SPARSE, "_floor": True, "factor_lr": _k}, f"floor, factors at {_k:g}x the lr")
for _lam in (0.01, 0.03, 0.1, 0.3):  # where lambda's steering starts (1e-3 by default, set for SGD)
    VARIANTS[f"kron-lam{_lam:g}"] = ({**SPARSE, "lam": _lam}, f"lambda steered from {_lam:g} (default 1e-3)")
VARIANTS["group-lasso"] = ({"method": "group-lasso", "target_sparsity": 0.5}, "group lasso, lambda steered from 1e-3")
VARIANTS["group-lasso-lam0.1"] = ({"method": "group-lasso", "target_sparsity": 0.5, "lam": 0.1},
                                  "group lasso, lambda steered from 0.1")
# the same at DeiT-tiny's width (hidden 192, 3 heads, MLP 768; 4 blocks, patch 7): is 8x right for wider layers?
WIDE = {"_vit": {"hidden": 192, "depth": 4, "heads": 3, "mlp": 768, "patch": 7}}
VARIANTS["wide-dense"] = ({**WIDE, "method": "dense"}, "hidden 192: dense W")
VARIANTS["wide-block-magnitude"] = ({**WIDE, "method": "block-magnitude", "target_sparsity": 0.5},
                                    "hidden 192: block magnitude pruning")
for _k in (1.0, 8.0, 16.0):
    VARIANTS[f"wide-kron-lr{_k:g}"] = ({**WIDE, **SPARSE, "factor_lr": _k}, f"hidden 192: factors at {_k:g}x the lr")
# the fashion-vit full setting (10 epochs on all 60,000 images): where do its 0.7 points go?
FULL = {**QUICK, "epochs": 10, "n_train": None}
VARIANTS["full-kron-nosparse"] = ({"_base": FULL, **NONE}, "full setting: Kronecker factors (8x lr), no penalty")
VARIANTS["full-kron-r8"] = ({"_base": FULL, **SPARSE, "rank": 8}, "full setting: rank 8 (8x lr), 50%")
for _k in (4.0, 16.0):
    VARIANTS[f"full-kron-lr{_k:g}"] = ({"_base": FULL, **SPARSE, "factor_lr": _k},
                                      f"full setting: factors at {_k:g}x the lr, 50%")
# the default's reach: Adam on the MNIST MLP (784-300-100-10) and LeNet-5, 2 epochs, 2x2 blocks, rank 2, 60%
ADAM = {**MNIST, "optimizer": "adam", "lr": 1e-3, "epochs": 2}
for _model in ("mlp", "lenet5"):
    _b = {"_base": {**ADAM, "model": _model}, "block_shape": (2, 2), "rank": 2}
    VARIANTS[f"adam-{_model}-dense"] = ({**_b, "method": "dense"}, f"Adam, MNIST {_model}: dense W")
    VARIANTS[f"adam-{_model}-block-magnitude"] = ({**_b, "method": "block-magnitude", "target_sparsity": 0.6},
                                                 f"Adam, MNIST {_model}: block magnitude pruning, 60% of 2x2")
    for _k in (1.0, 8.0):
        VARIANTS[f"adam-{_model}-kron-lr{_k:g}"] = ({**_b, "method": "kron", "target_sparsity": 0.6, "factor_lr": _k},
                                                   f"Adam, MNIST {_model}: kron 60% of 2x2, factors at {_k:g}x the lr")
# and under SGD on the MLP (the quick row: 2 epochs, 2x2, rank 2, 60%, SGD 0.01)
_b = {"_base": {**MNIST, "model": "mlp", "epochs": 2}, "block_shape": (2, 2), "rank": 2}
VARIANTS["sgd-mlp-block-magnitude"] = ({**_b, "method": "block-magnitude", "target_sparsity": 0.6},
                                       "SGD, MNIST mlp: block magnitude pruning, 60% of 2x2")
for _k in (1.0, 2.0, 4.0, 8.0):
    VARIANTS[f"sgd-mlp-kron-lr{_k:g}"] = ({**_b, "method": "kron", "target_sparsity": 0.6, "factor_lr": _k},
                                         f"SGD, MNIST mlp: kron 60% of 2x2, factors at {_k:g}x the lr")
_b = {"_base": {**MNIST, "model": "mlp", "epochs": 2, "lr": 0.05}, "block_shape": (2, 2), "rank": 2}
for _k in (1.0, 8.0):  # SGD at 5x the README's lr: does 8x still train?
    VARIANTS[f"sgd05-mlp-kron-lr{_k:g}"] = ({**_b, "method": "kron", "target_sparsity": 0.6, "factor_lr": _k},
                                           f"SGD lr 0.05, MNIST mlp: kron 60% of 2x2, factors at {_k:g}x the lr")
_b = {"_base": {**MNIST, "model": "lenet5", "epochs": 2}, "block_shape": (2, 2), "rank": 2}
VARIANTS["sgd-lenet5-block-magnitude"] = ({**_b, "method": "block-magnitude", "target_sparsity": 0.6},
                                          "SGD, MNIST lenet5: block magnitude pruning, 60% of 2x2")
for _k in (1.0, 8.0):
    VARIANTS[f"sgd-lenet5-kron-lr{_k:g}"] = ({**_b, "method": "kron", "target_sparsity": 0.6, "factor_lr": _k},
                                            f"SGD, MNIST lenet5: kron 60% of 2x2, factors at {_k:g}x the lr")
_b = {"_base": {**MNIST, "model": "mlp"}, "block_shape": (2, 2), "rank": 2}
VARIANTS["sgd-mlp10-block-magnitude"] = ({**_b, "method": "block-magnitude", "target_sparsity": 0.6},
                                         "SGD, MNIST mlp, 10 epochs: block magnitude pruning, 60% of 2x2")
for _k in (1.0, 8.0):
    VARIANTS[f"sgd-mlp10-kron-lr{_k:g}"] = ({**_b, "method": "kron", "target_sparsity": 0.6, "factor_lr": _k},
                                           f"SGD, MNIST mlp, 10 epochs: kron 60% of 2x2, factors at {_k:g}x the lr")
for _k in (1.0, 8.0):  # the one-layer model under Adam (lr 1e-3, 10 epochs, the main job's blocks)
    VARIANTS[f"adam-linear-kron-lr{_k:g}"] = ({"_base": {**MNIST, "optimizer": "adam", "lr": 1e-3}, "method": "kron",
                                              "block_shape": (2, 2), "rank": 2, "target_sparsity": 0.6, "factor_lr": _k},
                                             f"Adam, MNIST linear, 10 epochs: kron 60% of 2x2, factors at {_k:g}x the lr")
MAIN = {"_base": MNIST, "method": "kron", "block_shape": (2, 2), "rank": 2, "target_sparsity": 0.6}
R4 = {"_base": MNIST, "method": "kron", "block_shape": (2, 16), "rank": 4, "target_sparsity": 0.5}
VARIANTS["mnist-main"] = (MAIN, "MNIST main job: linear, 2x2, rank 2, 60%, SGD (factors at x1 under SGD)")
VARIANTS["mnist-2x16-r4"] = (R4, "MNIST linear, 2x16, rank 4, 50%, SGD")
VARIANTS["mnist-2x16-group-lasso"] = ({**R4, "method": "group-lasso", "rank": 2}, "MNIST linear, group lasso 2x16 50%")
for _k in (0.5, 2.0, 4.0, 8.0):
    VARIANTS[f"mnist-main-lr{_k:g}"] = ({**MAIN, "factor_lr": _k}, f"main job, factors at {_k:g}x the lr")
    VARIANTS[f"mnist-2x16-r4-lr{_k:g}"] = ({**R4, "factor_lr": _k}, f"2x16 r4, factors at {_k:g}x the lr")
# every variant above was measured with the steering of its time (before issue 26): it keeps it
for _over, _ in VARIANTS.values():
    _over.setdefault("steering", "legacy")

# issue 26: does the penalty earn its place? the steering that follows the ramp through the penalty
# ("track", the default), the steering before it ("legacy": the final top-up did nearly all the
# pruning in short runs) and no penalty ("prune": gradual magnitude pruning of S on the same ramp)
MLP2 = {"_base": {**MNIST, "model": "mlp", "epochs": 2}, "block_shape": (2, 2), "rank": 2, "target_sparsity": 0.6}
ABLATION = {"": (QUICK, {"target_sparsity": 0.5}, "ViT quick"), "mnist-": (MNIST, MAIN, "MNIST main job (linear)"),
            "sgd-mlp-": (MLP2["_base"], MLP2, "SGD, MNIST mlp, 2x2, 60%")}
for _prefix, (_base, _over, _what) in ABLATION.items():
    for _method in ("kron", "group-lasso", "elastic-group-lasso"):
        if _prefix == "mnist-" and _method != "kron":
            continue
        for _steer, _how in (("track", "the penalty, steered by the order statistics (default)"),
                             ("legacy", "the penalty, lambda from 1e-3 at most 1.05x per 10 steps"),
                             ("prune", "no penalty: gradual magnitude pruning on the same ramp")):
            if _method != "kron" and _steer == "prune":
                continue
            VARIANTS[f"{_prefix}{_method}-steer-{_steer}"] = (
                {**_over, "_base": _base, "method": _method, "steering": _steer}, f"{_what}: {_method}, {_how}")


def _patch_floor() -> None:
    """After each steering update, layers below the ramp are pruned up to it (smallest block norms)."""
    import torch

    from kronsparse.blocks import matrix_view
    from kronsparse.functional import block_norms
    from kronsparse.methods import kron
    from kronsparse.methods.steering import count_for, select

    original = kron.KronMethod._prox

    def _prox(self, steps, step):
        original(self, steps, step)
        if step % self.steering.interval:
            return
        for k, layer in enumerate(self.layers):
            mask = self.masks[k]
            missing = count_for(self.steering.schedule(step), mask.numel()) - int((~mask).sum())
            if missing > 0:
                norms = block_norms(*matrix_view(layer.dense_weight(), layer.block_shape))
                drop = select([torch.where(mask, norms, torch.inf)], missing, largest=False)[0]
                self.masks[k] = mask & ~drop
                layer.S.masked_fill_(drop, 0.0)
        self._mask_grads()

    kron.KronMethod._prox = _prox


def _one(name: str, seed: int) -> dict:
    import torch

    from kronsparse.training.config import TrainConfig
    from kronsparse.training.train import train

    torch.set_num_threads(1)
    overrides, _ = VARIANTS[name]
    overrides = dict(overrides)
    if overrides.pop("_floor", False):
        _patch_floor()
    base = overrides.pop("_base", QUICK)
    if "_vit" in overrides:  # this worker's "vit" has another shape
        from kronsparse.training import vit

        vit.VIT_MODELS["vit"] = vit.ViTSpec(**overrides.pop("_vit"))
    cfg = TrainConfig(**{**base, **overrides, "seed": seed})
    settings = {k: v for k, v in VARIANTS[name][0].items() if k != "_base"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            m = train(cfg, out=Path(tmp) / "run", progress=False)
        except FloatingPointError as err:  # a diverged run is a result too
            return {"variant": name, "seed": seed, "test_accuracy": None, "diverged": str(err).split(";")[0],
                    "block_sparsity": None, "trainable_params": None, "settings": settings}
    return {"variant": name, "seed": seed, "test_accuracy": m["test_accuracy"], "block_sparsity": m["block_sparsity"],
            "factor_lr": m.get("factor_lr"),
            "trainable_params": m.get("train_params"), "topped_up_blocks": m.get("topped_up_blocks"),
            "zero_blocks": m.get("zero_blocks"), "wall_seconds": m["wall_seconds"], "settings": settings}


def topup_share(rs: list[dict]) -> str:
    """Mean share (%) of the zero blocks the final top-up made, over the runs that recorded both counts."""
    shares = [r["topped_up_blocks"] / r["zero_blocks"] for r in rs
              if r.get("topped_up_blocks") is not None and r.get("zero_blocks")]
    return f"{100 * statistics.mean(shares):.2f}" if shares else ""


def write_table(out: Path) -> None:
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    # the top-up column where runs recorded their zero blocks (the runs of issue 26 on)
    topup = any(r.get("zero_blocks") is not None for r in rows)
    lines = ["| variant | what changes | seeds | accuracy % (mean ± std over seeds) | block sparsity % | "
             + ("zero blocks from top-up % | " if topup else "") + "train params |",
             "|---|---|---|---|---|" + ("---|" if topup else "") + "---|"]
    for name, rs in by.items():
        if any(r["test_accuracy"] is None for r in rs):
            failed = next(r for r in rs if r["test_accuracy"] is None)
            lines.append(f"| {name} | {VARIANTS.get(name, ({}, ''))[1]} | {len(rs)} | {failed['diverged']} (seed "
                         f"{failed['seed']}) |  |  |" + ("  |" if topup else ""))
            continue
        acc = [100 * r["test_accuracy"] for r in rs]
        spread = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        params = next((r["trainable_params"] for r in rs if r["trainable_params"]), None)
        lines.append(f"| {name} | {VARIANTS.get(name, ({}, ''))[1]} | {len(rs)} | {statistics.mean(acc):.2f}{spread} | "
                     f"{100 * statistics.mean(r['block_sparsity'] for r in rs):.2f} | "
                     + (f"{topup_share(rs)} | " if topup else "")
                     + f"{'' if params is None else f'{params:,}'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("results/vit-variants"))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    if a.list:
        for name, (_, words) in VARIANTS.items():
            print(f"{name}: {words}")
        return
    unknown = [v for v in a.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s): {', '.join(unknown)} (see --list)")
    a.out.mkdir(parents=True, exist_ok=True)
    log = a.out / "runs.jsonl"
    done = set()
    if log.exists():
        done = {(json.loads(l)["variant"], json.loads(l)["seed"]) for l in log.read_text().splitlines() if l.strip()}
    todo = [(v, int(s)) for v in a.variants for s in a.seeds.split(",") if (v, int(s)) not in done]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(a.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        for r in pool.map(_one, [t[0] for t in todo], [t[1] for t in todo]):
            with log.open("a") as f:
                f.write(json.dumps(r) + "\n")
            result = (r.get("diverged") if r["test_accuracy"] is None else
                      f"{100 * r['test_accuracy']:.2f}% at {100 * r['block_sparsity']:.2f}%")
            print(f"{r['variant']} seed {r['seed']}: {result}", flush=True)
            write_table(a.out)


if __name__ == "__main__":
    main()

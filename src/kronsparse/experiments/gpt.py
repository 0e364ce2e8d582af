"""`kronsparse reproduce pycode-gpt`: the method on a byte-level GPT trained on Python source.

The ViT table's form on a language model: dense; kron at 4x4 rank 4 (the paper's setting) and at
8x8 / 16x16 at the largest rank whose training forward multiply-adds stay below dense's; block
magnitude pruning at each of those block sizes; RigL, group lasso and elastic group lasso at 50% of
the 4x4 blocks; iterative pruning at 50% of the weights; pattern selection over 4x4 / 8x8 / 16x16; and
dense GPTs of smaller width with about the trainable parameters, and about the training FLOPs, of
kron's cheapest setting. Every block Linear is sparsified; the embeddings and the tied head stay dense.

Runs live in DIR/runs/<name>/ and train in fresh worker processes (runner.py); a finished run is
reused only when its config is the one planned (runner.check_identity), so a re-run with another
penalty steering or another --width is one command into another --out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..blocks import block_name
from ..training.config import TrainConfig
from ..training.metrics import training_costs
from ..training.models import build_model, dense_factory, kron_factory, model_options
from .common import FunctionsExperiment, Spec

BLOCKS = ((4, 4), (8, 8), (16, 16))
TARGET = 0.5
PAPER_RANK = 4  # the paper's ViT setting, at 4x4
RANKS = (1, 2, 4, 8)  # tried, largest first, for the larger blocks
BASELINES = ("rigl", "group-lasso", "elastic-group-lasso")  # at 50% of 4x4 blocks
# AdamW 1e-3, 16 sequences of 128 bytes (2,048 tokens) per step, as in the probe
RECIPE = {"model": "gpt", "dataset": "pycode", "optimizer": "adamw", "lr": 1e-3, "standardize": False,
          "rank": PAPER_RANK, "width": 128, "layers": 4, "heads": 4, "context": 128, "batch_size": 16}
# quick: 2 blocks, 250 steps, val/test on their first 128 windows (16 KB); full: 4 blocks, 1,000 steps, all of val/test
QUICK = {"layers": 2, "epochs": 1, "n_train": 4_000, "n_test": 128}
FULL = {"epochs": 1, "n_train": 16_000}


def base_config(quick: bool, overrides: dict) -> TrainConfig:
    """The recipe with the quick or full length and the user's overrides (tokens_per_step -> batch_size)."""
    values = {**RECIPE, **(QUICK if quick else FULL), **overrides}
    tokens = values.pop("tokens_per_step", None)
    if tokens is not None:
        if tokens < values["context"] or tokens % values["context"]:
            raise ValueError(f"--tokens-per-step {tokens} must be a positive multiple of the context ({values['context']})")
        values["batch_size"] = tokens // values["context"]
    if values["model"] != "gpt":
        raise ValueError("pycode-gpt trains the GPT; --model must be gpt")
    return TrainConfig(**values)


def costs(cfg: TrainConfig, factory) -> dict:
    """Trainable parameters and forward multiply-adds per sequence of cfg's GPT built by `factory`."""
    model = build_model("gpt", factory, cfg.context, 256, model_options(cfg))
    return training_costs(model, cfg.batch_size)


def cheap_rank(cfg: TrainConfig, block) -> int:
    """The largest rank of RANKS whose training forward multiply-adds (our cost model, the path each layer
    runs at this batch) are below the dense model's; 1 if none is."""
    dense = costs(cfg, dense_factory)["train_macs"]
    return next((r for r in reversed(RANKS) if costs(cfg, kron_factory(block, r))["train_macs"] < dense), 1)


def matching_width(cfg: TrainConfig, key: str, target: float) -> int:
    """The dense width (a multiple of the heads, below cfg's) whose `key` (train_params or train_macs) is
    closest to `target`."""
    widths = range(cfg.heads, cfg.width, cfg.heads)
    if not widths:
        raise ValueError(f"width {cfg.width} leaves no smaller dense width with {cfg.heads} heads")
    return min(widths, key=lambda w: abs(costs(dataclasses.replace(cfg, width=w), dense_factory)[key] - target))


def plan(seeds: list[int], base: TrainConfig) -> list[Spec]:
    """Role "table": every run above; role "small": the smaller dense GPTs."""
    ranks = {b: PAPER_RANK if b == (4, 4) else cheap_rank(base, b) for b in BLOCKS}
    cheapest = min(BLOCKS, key=lambda b: costs(base, kron_factory(b, ranks[b]))["train_macs"])
    target = costs(base, kron_factory(cheapest, ranks[cheapest]))
    widths = sorted({matching_width(base, k, target[k]) for k in ("train_params", "train_macs")})
    specs: list[Spec] = []

    def add(role: str, name: str, **changes) -> None:
        cfg = dataclasses.replace(base, **changes)
        specs.append(Spec(f"{name}-s{cfg.seed}", cfg, role))

    for seed in seeds:  # the goal's runs first (dense, 8x8, 16x16, the smaller dense GPTs): a cut-short run has them
        add("table", "dense", method="dense", seed=seed)
        for b in (BLOCKS[1], BLOCKS[2], BLOCKS[0]):
            add("table", f"kron-{block_name(b)}-r{ranks[b]}-t{TARGET:g}", method="kron", block_shape=b, rank=ranks[b],
                target_sparsity=TARGET, seed=seed)
            add("table", f"block-magnitude-{block_name(b)}-t{TARGET:g}", method="block-magnitude", block_shape=b,
                target_sparsity=TARGET, seed=seed)
            if b == BLOCKS[2]:
                for w in widths:
                    add("small", f"dense-w{w}", method="dense", width=w, seed=seed)
        for method in BASELINES:
            add("table", f"{method}-4x4-t{TARGET:g}", method=method, block_shape=(4, 4), target_sparsity=TARGET, seed=seed)
        add("table", f"iterative-pruning-t{TARGET:g}", method="iterative-pruning", block_shape=(4, 4),
            target_sparsity=TARGET, seed=seed)
        add("table", f"select-r{PAPER_RANK}-t{TARGET:g}", method="select", block_shape=BLOCKS[0], rank=PAPER_RANK,
            candidates=BLOCKS, target_sparsity=TARGET, seed=seed)
    return specs


def write_report(specs: list[Spec], out: Path) -> None:
    from .gpt_report import write_report  # matplotlib, safetensors: only when a report is written

    write_report(specs, out)


# fresh_process: each run's peak memory its own
EXPERIMENTS = {"pycode-gpt": FunctionsExperiment("pycode-gpt", base_config, plan, write_report, fresh_process=True)}

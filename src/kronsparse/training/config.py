"""One dataclass per training run; the CLI is built from it and it is saved beside every result."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..limits import check_at_most
from ..methods.kron import SCALE_PINS
from ..methods.steering import STEERINGS

DEVICE_TYPES = ("cpu", "cuda", "mps")
TEXT_MODELS = ("gpt",)  # models.ARCHITECTURES' language model
TEXT_DATASETS = ("pycode",)  # text.TEXT_DATASETS (a test keeps them equal)
GPT_OPTIONS = ("width", "layers", "heads", "context")


def flag(name: str) -> str:
    """The command-line option of config field `name`: "lam" -> "--lambda", "n_train" -> "--n-train"."""
    return "--lambda" if name == "lam" else "--" + name.replace("_", "-")


def check_device_name(name: str) -> None:
    """A device kronsparse can train on (cpu, cuda, cuda:N, mps); availability is checked at run time."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {name!r}; use one of {', '.join(DEVICE_TYPES)} (e.g. cuda:0)")


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults follow the paper's MNIST protocol (SGD 0.01, momentum 0.9, batch 64)."""

    method: str = "kron"
    model: str = "linear"
    dataset: str = "mnist"
    data_dir: str | None = None
    block_shape: tuple[int, int] = (2, 2)  # (bo, bi): the shape of every B_i, in nn.Linear's (out, in) order
    rank: int = 2
    lam: float | None = None  # penalty strength; None: method default (0 unless a target steers it)
    target_sparsity: float | None = None  # fraction of zero blocks to reach; steers lambda
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float | None = None  # None: method default (1e-3 on A, B for kron; 0 for dense)
    scale_pin: str = "auto"  # kron: how the scale is kept from escaping into A, see methods/kron.py
    # kron/select: lr of A, B, S as a multiple of --lr; None: 8 under adam/adamw (deep models), else 1
    factor_lr: float | None = None
    steering: str = "track"  # proximal methods: how the zeros follow the ramp (methods/steering.py)
    batch_size: int = 64
    epochs: int = 10
    sparsify_fraction: float = 0.7  # share of training that sparsifies; then the mask is frozen
    seed: int = 0
    device: str = "cpu"
    # CPU threads; None: 1. torch's OpenMP threads spin-wait between the many small kernels of these models,
    # which on a busy 2-core machine made 2 threads 8x (linear) to 17-32x (MLP) slower than 1 (README, Training)
    threads: int | None = None
    standardize: bool = True  # inputs minus the train mean, over the train std (every README result)
    path: str = "auto"  # KronLinear contraction path
    n_train: int | None = None  # use only the first n training samples (quick runs, tests)
    n_test: int | None = None
    candidates: tuple[tuple[int, int], ...] | None = None  # pattern selection (method "select")
    # --model gpt only (None: gpt.GPTSpec's default; left out of to_dict, so older configs stay equal)
    width: int | None = None  # residual width
    layers: int | None = None  # transformer blocks
    heads: int | None = None  # attention heads
    context: int | None = None  # tokens per sequence (a batch holds batch_size * context tokens)

    def __post_init__(self) -> None:
        self.block_shape = tuple(int(v) for v in self.block_shape)
        if self.candidates is not None:
            self.candidates = tuple(tuple(int(v) for v in c) for c in self.candidates)
        self.validate()

    def validate(self) -> None:
        """Range checks that need no data, before anything is allocated; each failure is one clear line."""
        positive = {"rank": self.rank, "batch_size": self.batch_size, "epochs": self.epochs}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
            if name in ("rank", "epochs", "batch_size"):
                check_at_most(name, value)
        for name in ("lr", "momentum", "lam", "weight_decay", "target_sparsity", "sparsify_fraction", "factor_lr"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{flag(name)} must be a finite number, got {value!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.factor_lr is not None and self.factor_lr <= 0:
            raise ValueError(f"--factor-lr must be > 0, got {self.factor_lr}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.scale_pin not in SCALE_PINS:
            raise ValueError(f"unknown scale pin {self.scale_pin!r}; valid: {', '.join(SCALE_PINS)}")
        if self.steering not in STEERINGS:
            raise ValueError(f"unknown steering {self.steering!r}; valid: {', '.join(STEERINGS)}")
        if not 0.0 < self.sparsify_fraction <= 1.0:
            raise ValueError(f"sparsify fraction must be in (0, 1], got {self.sparsify_fraction}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        for name in ("n_train", "n_test"):  # 0 used to mean "all": say so instead
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{flag(name)} must be >= 1 (leave it out to use every sample), got {value}")
        if self.threads is not None:
            if self.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {self.threads}")
            check_at_most("threads", self.threads, "--threads")
        if self.data_dir is not None and not str(self.data_dir):
            raise ValueError("--data-dir must not be empty")
        if self.candidates is not None:
            check_at_most("candidates", len(self.candidates), "--candidates: the number of block shapes,")
        check_device_name(self.device)
        self.validate_text()

    def validate_text(self) -> None:
        """The GPT's shape options are positive and only for --model gpt; gpt trains on a text corpus."""
        for name in GPT_OPTIONS:
            value = getattr(self, name)
            if value is None:
                continue
            if self.model not in TEXT_MODELS:
                raise ValueError(f"{flag(name)} is an option of --model gpt, not of --model {self.model}")
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag(name)} must be an integer >= 1, got {value!r}")
            check_at_most(name, value, flag(name))
        if (self.model in TEXT_MODELS) != (self.dataset in TEXT_DATASETS):
            raise ValueError(f"--model {self.model} cannot train on --dataset {self.dataset}: the language model "
                             f"({', '.join(TEXT_MODELS)}) trains on {', '.join(TEXT_DATASETS)}, the others on images")

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in GPT_OPTIONS:
            if d[name] is None:
                del d[name]
        d["block_shape"] = list(self.block_shape)
        if self.candidates is not None:
            d["candidates"] = [list(c) for c in self.candidates]
        return d

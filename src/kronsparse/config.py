"""One dataclass per training run; the CLI is built from it and it is saved beside every result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


def parse_block(text: str) -> tuple[int, int]:
    """'2x16' -> (2, 16): OUTxIN in nn.Linear's (out, in) order (the paper's "16x2")."""
    try:
        bo, bi = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"block shape must look like OUTxIN, e.g. 2x16, got {text!r}") from None
    if bo < 1 or bi < 1:
        raise ValueError(f"block shape sides must be positive, got {text!r}")
    return bo, bi


SCALE_PINS = ("auto", "decay", "norm")


def resolve_scale_pin(pin: str, model: str) -> str:
    """The kron method's scale pin for `model` (see methods/kron.py): "auto" is "decay" on the
    one-layer linear model and "norm" on every deeper model, where "decay" loses 8 points (MLP,
    10 epochs, 2x2: 90.42% vs 98.15%)."""
    if pin != "auto":
        return pin
    return "decay" if model == "linear" else "norm"


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults follow the paper's MNIST protocol (METHOD.md §6)."""

    method: str = "kron"
    model: str = "linear"
    dataset: str = "mnist"
    data_dir: str | None = None
    block_shape: tuple[int, int] = (2, 2)  # (bo, bi), see METHOD.md §1
    rank: int = 2
    lam: float | None = None  # penalty strength; None: method default (0 unless a target steers it)
    target_sparsity: float | None = None  # fraction of zero blocks to reach; steers lambda
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float | None = None  # None: method default (1e-3 on A, B for kron; 0 for dense)
    scale_pin: str = "auto"  # kron: how the scale is kept from escaping into A, see resolve_scale_pin
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

    def __post_init__(self) -> None:
        self.block_shape = tuple(int(v) for v in self.block_shape)
        if self.candidates is not None:
            self.candidates = tuple(tuple(int(v) for v in c) for c in self.candidates)
        self.validate()

    def validate(self) -> None:
        """Plain range checks that need no data; each failure is one clear line."""
        positive = {"rank": self.rank, "batch_size": self.batch_size, "epochs": self.epochs}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in [0, 1), got {self.target_sparsity}")
        if self.lam is not None and self.lam < 0:
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if self.scale_pin not in SCALE_PINS:
            raise ValueError(f"unknown scale pin {self.scale_pin!r}; valid: {', '.join(SCALE_PINS)}")
        if not 0.0 < self.sparsify_fraction <= 1.0:
            raise ValueError(f"sparsify fraction must be in (0, 1], got {self.sparsify_fraction}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_shape"] = list(self.block_shape)
        if self.candidates is not None:
            d["candidates"] = [list(c) for c in self.candidates]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**d)

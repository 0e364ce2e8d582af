"""Training-step time and memory of one KronLinear against the dense layers it replaces.

A script, not a test. For every case of a grid (layer size x block shape x rank x tokens) it times,
in the same process and interleaved round-robin (so background load hits every variant alike):

- dense        nn.Linear
- dense_mask   nn.Linear with a fixed block mask, weight * mask in forward (what RigL/pruning pay)
- dense_gl     nn.Linear + the group-lasso proximal map after each optimizer step
- kron:<path>  KronLinear with path input_first, factors_first, materialize and auto

in three modes: `fb` (forward + backward; input requires grad, upstream gradient given, as inside a
network), `step` (fb + optimizer step + zero_grad) and `step_x0` (the same with an input that needs
no gradient: the first layer of a model). Times are medians over --repeats steps after --warmup.
Memory: bytes of the tensors autograd saves in forward (saved_tensors_hooks), bytes of the training
state (params + grads + optimizer state), the peak bytes one forward + backward allocates on top of
what exists before it (benchmarks/memory.py: the profiler's allocation events on CPU,
max_memory_allocated on CUDA), the memory model's prediction of that peak
(kronsparse.costs.train_peak_bytes) and its ratio to dense's.

    python benchmarks/bench_train_step.py --quick
    python benchmarks/bench_train_step.py --sizes 784x10 --blocks 2x2,2x16 --ranks 2 --tokens 64

Writes benchmarks/results/<device>-<date>.json (metadata + one record per case and variant) and
a markdown table beside it (ratio vs dense of the same run, MACs, bytes-moved estimate, GFLOP/s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import fb_peak_bytes  # noqa: E402

from kronsparse import KronLinear  # noqa: E402
from kronsparse import functional as KF  # noqa: E402
from kronsparse.costs import choose_path, dense_train_peak_bytes, path_macs, train_peak_bytes  # noqa: E402
from kronsparse.kernels import PATHS  # noqa: E402

KRON_PATHS = PATHS  # the library's own list, so a new path is benchmarked too
MODES = ("fb", "step", "step_x0")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One layer configuration: W is (out_features, in_features), tokens rows of input."""

    in_features: int
    out_features: int
    block_shape: tuple[int, int]
    rank: int
    tokens: int


@dataclass
class Record:
    """Timings and memory of one variant on one case in one mode."""

    case: dict
    variant: str
    mode: str
    path: str  # the path that ran ("auto" resolved), "dense" for the dense variants
    median_ms: float
    min_ms: float
    times_ms: list[float] = field(repr=False)
    ratio_vs_dense: float = float("nan")
    train_macs: int = 0
    gflops: float = 0.0
    bytes_moved_est: int = 0
    saved_bytes: int = 0
    state_bytes: int = 0
    cuda_peak_bytes: int | None = None
    peak_bytes: int = 0  # forward + backward, above what exists before it (benchmarks/memory.py)
    model_peak_bytes: int = 0  # kronsparse.costs' prediction of peak_bytes (dense: dense_train_peak_bytes)
    peak_vs_dense: float = float("nan")


# ----------------------------------------------------------------------------------------------
# Variants: each is a module plus a hook run after the optimizer step
# ----------------------------------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """nn.Linear with a fixed block mask multiplied into the weight in every forward."""

    def __init__(self, in_features, out_features, block_shape, **kw):
        super().__init__(in_features, out_features, **kw)
        m1, n1 = out_features // block_shape[0], in_features // block_shape[1]
        mask = torch.rand(m1, n1) < 0.5  # half the blocks active, RigL's usual density
        self.register_buffer("mask", KF.expand_block_mask(mask, block_shape).to(**kw))

    def forward(self, x):
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


def make_variant(name: str, case: Case, device, dtype):
    """(module, after_step hook or None) for a variant name."""
    kw = {"device": device, "dtype": dtype}
    if name == "dense":
        return nn.Linear(case.in_features, case.out_features, **kw), None
    if name == "dense_mask":
        return MaskedLinear(case.in_features, case.out_features, case.block_shape, **kw), None
    if name == "dense_gl":
        layer = nn.Linear(case.in_features, case.out_features, **kw)

        def prox():
            with torch.no_grad():
                layer.weight.copy_(KF.group_shrink(layer.weight, case.block_shape, 1e-4))
        return layer, prox
    path = name.split(":", 1)[1]
    return KronLinear(case.in_features, case.out_features, case.block_shape, case.rank, path=path, **kw), None


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adam")


# ----------------------------------------------------------------------------------------------
# One step, timed
# ----------------------------------------------------------------------------------------------


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def make_step(module, opt, after_step, x, gy, mode: str):
    """A closure running one forward + backward (+ optimizer step in the step modes)."""

    def step():
        y = module(x)
        y.backward(gy)
        if mode != "fb":
            opt.step()
            if after_step is not None:
                after_step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def time_round_robin(steps: dict, repeats: int, warmup: int, device, clock=time.perf_counter) -> dict[str, list[float]]:
    """Run every step once per round, `warmup + repeats` rounds; milliseconds after warm-up (by
    `clock`: wall time, or time.thread_time for the CPU time of a one-thread CPU run)."""
    times = {k: [] for k in steps}
    for rnd in range(warmup + repeats):
        for name, step in steps.items():
            sync(device)
            t0 = clock()
            step()
            sync(device)
            if rnd >= warmup:
                times[name].append((clock() - t0) * 1e3)
    return times


# ----------------------------------------------------------------------------------------------
# Memory and work estimates
# ----------------------------------------------------------------------------------------------


def saved_bytes(module, x) -> int:
    """Bytes of the distinct tensors autograd saves in one forward of module(x)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(seen.values())


def model_peak(case: Case, path: str, need_x: bool, elem: int) -> int:
    """The memory model's peak for what ran ("dense" for the dense variants, which it does not model
    beyond plain nn.Linear)."""
    if path == "dense":
        return dense_train_peak_bytes(case.in_features, case.out_features, case.tokens, need_x, True, elem)
    return train_peak_bytes(case.in_features, case.out_features, case.block_shape, case.rank, case.tokens, path,
                            need_x, True, elem)


def state_bytes(module, opt) -> int:
    """Parameters + gradients + optimizer state, in bytes (after one step, so state exists)."""
    total = 0
    for p in module.parameters():
        total += 2 * p.numel() * p.element_size()  # value + grad
        for v in opt.state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel() * v.element_size()
    return total


def resolved_path(variant: str, case: Case, training: bool, need_x: bool) -> str:
    if not variant.startswith("kron:"):
        return "dense"
    path = variant.split(":", 1)[1]
    if path != "auto":
        return path
    return choose_path(case.in_features, case.out_features, case.block_shape, case.rank, case.tokens, training,
                       need_x)


def train_macs(case: Case, path: str, need_x: bool) -> int:
    """Multiply-adds of forward + backward for the whole batch (the matmuls that run).

    Dense: 3 GEMMs (2 without an input gradient). Factored: forward F1 + F2, backward recomputes
    F1 then 2*F1 + 2*F2 (less one of each without an input gradient). Materialize: the dense
    GEMMs plus building W (r*out*in) and reducing dW to the factors (2*r*out*in).
    """
    o, i, N, r = case.out_features, case.in_features, case.tokens, case.rank
    gemms = 3 if need_x else 2
    if path in ("dense", "materialize"):
        extra = 3 * r * o * i if path == "materialize" else 0
        return gemms * N * o * i + extra
    bo, bi = case.block_shape
    m1, n1 = o // bo, i // bi
    f1, f2 = (n1 * bi * bo, m1 * n1 * bo) if path == "input_first" else (m1 * n1 * bi, m1 * bi * bo)
    return N * r * ((gemms + 1) * f1 + gemms * f2)


def bytes_moved(case: Case, path: str, elem: int) -> int:
    """Rough DRAM traffic of forward + backward: every operand read once, every result written once."""
    o, i, N, r = case.out_features, case.in_features, case.tokens, case.rank
    act = 3 * N * (i + o)  # x (fwd + 2x bwd), y, gy, gx
    if path == "dense":
        return elem * (act + 3 * o * i)
    if path == "materialize":
        return elem * (act + 6 * o * i)  # W written, read twice, dW written, read
    bo, bi = case.block_shape
    m1, n1 = o // bo, i // bi
    inter = N * r * (n1 * bo if path == "input_first" else m1 * bi)
    return elem * (act + 6 * inter)  # written and read in forward, twice again in backward


# ----------------------------------------------------------------------------------------------
# The grid
# ----------------------------------------------------------------------------------------------


def parse_pairs(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_cases(text: str) -> list[Case]:
    """'784x10:2x2:2:64,...' (in x out : bo x bi : rank : tokens) -> cases."""
    cases = []
    for item in text.split(","):
        size, block, rank, tokens = item.split(":")
        (in_f, out_f), (bo, bi) = parse_pairs(size)[0], parse_pairs(block)[0]
        cases.append(Case(in_f, out_f, (bo, bi), int(rank), int(tokens)))
    return cases


def build_grid(args) -> list[Case]:
    """Every (size, block, rank, tokens) whose block tiles the layer; sizes are in x out."""
    if args.cases:
        return parse_cases(args.cases)
    cases = []
    for in_f, out_f in parse_pairs(args.sizes):
        for bo, bi in parse_pairs(args.blocks):
            if out_f % bo or in_f % bi or (bo, bi) == (out_f, in_f):
                continue
            for r in parse_ints(args.ranks):
                if r > min((out_f // bo) * (in_f // bi), bo * bi):
                    continue
                for n in parse_ints(args.tokens):
                    cases.append(Case(in_f, out_f, (bo, bi), r, n))
    return cases


def run_case(case: Case, args, device, dtype) -> list[Record]:
    """Time every variant in every mode on one case; ratios are against dense in the same round."""
    torch.manual_seed(0)
    variants = ["dense", "dense_mask", "dense_gl"] + [f"kron:{p}" for p in KRON_PATHS]
    records = []
    for mode in args.modes:
        need_x = mode != "step_x0"
        x = torch.randn(case.tokens, case.in_features, device=device, dtype=dtype, requires_grad=need_x)
        gy = torch.randn(case.tokens, case.out_features, device=device, dtype=dtype)
        built = {v: make_variant(v, case, device, dtype) for v in variants}
        opts = {v: make_optimizer(args.optimizer, m.parameters()) for v, (m, _) in built.items()}
        steps = {v: make_step(m, opts[v], hook, x, gy, mode) for v, (m, hook) in built.items()}
        if torch.device(device).type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = time_round_robin(steps, args.repeats, args.warmup, device)
        dense_ms = statistics.median(times["dense"])
        peaks = {v: fb_peak_bytes(m, x, gy, device) for v, (m, _) in built.items()}
        for v, (module, _) in built.items():
            path = resolved_path(v, case, training=True, need_x=need_x)
            med = statistics.median(times[v])
            macs = train_macs(case, path, need_x)
            records.append(Record(
                asdict(case), v, mode, path, round(med, 4), round(min(times[v]), 4),
                [round(t, 4) for t in times[v]], round(med / dense_ms, 3), macs,
                round(2 * macs / (med * 1e-3) / 1e9, 2),
                bytes_moved(case, "dense" if path == "dense" else path, x.element_size()),
                saved_bytes(module, x), state_bytes(module, opts[v]),
                torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None,
                peaks[v], model_peak(case, path, need_x, x.element_size()), round(peaks[v] / peaks["dense"], 3),
            ))
    return records


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def metadata(args, device, dtype) -> dict:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": device,
        "device_name": name,
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "optimizer": args.optimizer,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
    }


def markdown(meta: dict, records: list[Record]) -> str:
    """One table row per case, mode and variant; ratio < 1 means faster than dense."""
    head = (f"# Training-step benchmark, {meta['device_name']} ({meta['device']}), {meta['dtype']}, "
            f"{meta['threads']} threads, torch {meta['torch']}, {meta['date']}\n\n"
            f"Command: `{meta['command']}`. Optimizer: {meta['optimizer']}. Median of {meta['repeats']} "
            f"steps after {meta['warmup']} warm-up, variants interleaved round-robin. Modes: fb = forward + "
            "backward (input requires grad, upstream gradient given); step = fb + optimizer step; step_x0 = "
            "step with an input that needs no gradient. MACs: forward multiply-adds per sample "
            "(kronsparse.costs; 2 FLOPs each). GFLOP/s from the multiply-adds of the matmuls that ran. fb peak: bytes one "
            "forward + backward allocates above what exists before it (benchmarks/memory.py); model: "
            "kronsparse.costs.train_peak_bytes (dense_mask and dense_gl: plain nn.Linear's).\n\n")
    cols = ("in x out", "block (bo,bi)", "r", "tokens", "mode", "variant", "path", "median ms", "x dense",
            "fwd MACs/sample", "GFLOP/s", "bytes moved (est)", "saved bytes", "state bytes", "fb peak MiB",
            "model MiB", "peak x dense")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        c = r.case
        lines.append("| " + " | ".join(str(v) for v in (
            f"{c['in_features']}x{c['out_features']}", f"{c['block_shape'][0]}x{c['block_shape'][1]}", c["rank"],
            c["tokens"], r.mode, r.variant, r.path, f"{r.median_ms:.3f}", f"{r.ratio_vs_dense:.2f}",
            fwd_macs(c, r.path), f"{r.gflops:.1f}", r.bytes_moved_est, r.saved_bytes, r.state_bytes,
            f"{r.peak_bytes / 2**20:.2f}", f"{r.model_peak_bytes / 2**20:.2f}", f"{r.peak_vs_dense:.2f}")) + " |")
    return head + "\n".join(lines) + "\n"


def fwd_macs(c: dict, path: str) -> int:
    if path == "dense":
        return c["in_features"] * c["out_features"]
    return getattr(path_macs(c["in_features"], c["out_features"], tuple(c["block_shape"]), c["rank"]), path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="784x10,1024x1024,2048x2048", help="in x out, comma separated")
    p.add_argument("--blocks", default="2x2,2x16,4x4,8x8,16x16,32x32,64x64", help="bo x bi, comma separated")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--tokens", default="64,256,1024,4096")
    p.add_argument("--cases", default=None, help="explicit cases 'in x out:bo x bi:rank:tokens,...' (overrides grid)")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--quick", action="store_true", help="only the speed issue's target cases (~1 minute)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/<device>-<date>)")
    args = p.parse_args(argv)
    if args.quick:
        args.cases = "784x10:2x2:2:64,784x10:2x16:2:64,2048x2048:16x16:2:512"  # the speed issue's targets
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    meta = metadata(args, args.device, dtype)
    records = []
    for case in build_grid(args):
        t0 = time.perf_counter()
        records += run_case(case, args, args.device, dtype)
        auto = [r for r in records[-len(args.modes) * 7:] if r.variant == "kron:auto"]
        print(f"{case}: auto/dense " + ", ".join(f"{r.mode} {r.ratio_vs_dense:.2f}" for r in auto)
              + f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    stem = Path(args.out) if args.out else RESULTS / f"{torch.device(args.device).type}-{dt.date.today()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": [asdict(r) for r in records]}, indent=1))
    stem.with_suffix(".md").write_text(markdown(meta, records))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()

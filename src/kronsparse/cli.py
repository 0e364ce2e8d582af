"""The command line: `kronsparse train | shapes | reproduce | export`. User mistakes get one line and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .config import SCALE_PINS, TrainConfig, parse_block

ROW_KEYS = ("method", "model", "dataset", "paper_block_name", "rank", "test_accuracy", "block_sparsity",
            "weight_sparsity", "train_params", "train_macs", "inference_params", "wall_seconds")


class UserError(Exception):
    """A mistake of the user's: printed as one line, no traceback."""


def _blocks(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_block(t) for t in text.split(",") if t)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig.__dataclass_fields__
    p.add_argument("--method", default=d["method"].default)
    p.add_argument("--model", default=d["model"].default)
    p.add_argument("--dataset", default=d["dataset"].default, help="mnist, fashion-mnist or npz:PATH")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--block", default="2x2", help="OUTxIN in nn.Linear's order; the paper's 16x2 is 2x16")
    p.add_argument("--rank", type=int, default=d["rank"].default)
    p.add_argument("--lambda", dest="lam", type=float, default=None)
    p.add_argument("--target-sparsity", type=float, default=None, help="fraction of zero blocks to reach")
    p.add_argument("--optimizer", default=d["optimizer"].default)
    p.add_argument("--lr", type=float, default=d["lr"].default)
    p.add_argument("--momentum", type=float, default=d["momentum"].default)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--scale-pin", default=d["scale_pin"].default, choices=SCALE_PINS,
                   help="kron: decay (weight decay on A) or norm (each block's A at unit norm, S "
                        "carrying its size); auto (default): decay on the linear model, norm on deeper ones")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default)
    p.add_argument("--epochs", type=int, default=d["epochs"].default)
    p.add_argument("--sparsify-fraction", type=float, default=d["sparsify_fraction"].default)
    p.add_argument("--seed", type=int, default=d["seed"].default)
    p.add_argument("--device", default=d["device"].default)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--standardize", action="store_true")
    p.add_argument("--path", default=d["path"].default, help="auto, input_first, factors_first, materialize")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--candidates", default=None, help="block shapes for --method select, e.g. 2x2,2x8")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints in OUT/checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)} - {"candidates"}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["block_shape"] = parse_block(args.block)
    values["candidates"] = _blocks(args.candidates) if args.candidates else None
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = config_from_args(args)
    metrics = train(cfg, out=args.out, progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
                    resume=args.resume)
    print_row(metrics)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'model.safetensors'}")
    return 0


def print_row(metrics: dict) -> None:
    """The run as one markdown table row with its header."""
    print("| " + " | ".join(ROW_KEYS) + " |")
    print("|" + "---|" * len(ROW_KEYS))
    cells = []
    for key in ROW_KEYS:
        v = metrics[key]
        cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
    print("| " + " | ".join(cells) + " |")


def cmd_shapes(args: argparse.Namespace) -> int:
    from .costs import layer_costs, plan_block_shapes

    rows = plan_block_shapes(args.in_features, args.out_features, args.rank, bias=not args.no_bias)
    dense = layer_costs(args.in_features, args.out_features, (1, 1), 1, bias=not args.no_bias)
    print(f"layer {args.in_features} -> {args.out_features} (weight {args.out_features}x{args.in_features}), "
          f"rank {args.rank}; dense: {dense.dense_params} params, {dense.dense_macs} MACs/sample")
    print("| block (out x in) | paper name (in x out) | train params | MACs/sample | |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.block_shape[0]}x{r.block_shape[1]} | {r.paper_name} | {r.train_params} | {r.macs} | "
              f"{'fewest params' if r.best else ''} |")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test), ("epochs", args.epochs),
                                   ("device", args.device), ("model", args.model)) if v is not None}
    if args.experiment == "fashion-vit":  # vit_reproduce.py: its own plan, runner and report
        from .vit_reproduce import reproduce_vit

        reproduce_vit(args.out, seeds, quick=args.quick, jobs=args.jobs, overrides=overrides)
    elif "model" in overrides:
        raise UserError(f"--model is for fashion-vit; {args.experiment} trains its own model")
    else:
        reproduce(args.experiment, args.out, seeds, quick=args.quick, jobs=args.jobs, overrides=overrides)
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run

    path = export_run(args.run_dir, args.format, args.out)
    print(f"wrote {path} ({args.format})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block); subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kronsparse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one model and write metrics.json + model.safetensors")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("shapes", help="every block shape of a layer with its training cost")
    p.add_argument("in_features", type=int)
    p.add_argument("out_features", type=int)
    p.add_argument("--rank", type=int, default=1)
    p.add_argument("--no-bias", action="store_true")
    p.set_defaults(func=cmd_shapes)
    p = sub.add_parser("reproduce", help="the paper's comparison: every method, tables, plots, report")
    p.add_argument("experiment", help="mnist-linear, mnist-mlp, fashion-mnist-linear or fashion-vit")
    p.add_argument("--out", required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="2 epochs, one seed, a short sweep")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--model", default=None, help="fashion-vit: vit (default) or vit-tiny (the paper's, 224 px)")
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("export", help="write a run's model as dense, BSR or factor tensors (safetensors)")
    p.add_argument("run_dir", help="a folder written by `kronsparse train`")
    p.add_argument("--format", default="dense", help="dense, bsr or factors")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model.FORMAT.safetensors)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FloatingPointError as err:
        print(f"kronsparse: training diverged: {err}", file=sys.stderr)
        return 3
    except (UserError, DataError, ValueError, OSError, MemoryError) as err:  # OSError: disk full, read-only, ...
        print(f"kronsparse: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # torch's allocator: a size no check above foresaw
        if "can't allocate memory" not in str(err) and "out of memory" not in str(err):
            raise
        print(f"kronsparse: error: out of memory ({_one_line(err)[-200:]})", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    if isinstance(err, MemoryError):
        return "out of memory (lower the sizes asked for)"
    if isinstance(err, OSError) and err.strerror:
        where = " ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        return f"{err.strerror}{': ' + where if where else ''}"
    text = " ".join(str(err).split())
    return text if len(text) <= 1000 else text[:1000] + "..."


if __name__ == "__main__":
    sys.exit(main())

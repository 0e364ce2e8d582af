"""The command line: `kronsparse train | shapes | reproduce | export`. User mistakes get one line and exit code 2.

The door of the application: the training app (training/) and the experiments (experiments/) are
imported by the functions that need them, so `import kronsparse.cli` loads only the library.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from .blocks import parse_block
from .costs import layer_costs, plan_block_shapes
from .limits import env_name, limit
from .methods.kron import SCALE_PINS
from .methods.steering import STEERINGS

ROW_KEYS = ("method", "model", "dataset", "paper_block_name", "rank", "test_accuracy", "block_sparsity",
            "weight_sparsity", "train_params", "train_macs", "inference_params", "wall_seconds")


class UserError(Exception):
    """A mistake of the user's: printed as one line, no traceback."""


def _blocks(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(parse_block(t) for t in text.split(",") if t)


# the help's order (the paper's method first); a test keeps them equal to methods.METHODS and training.models.ARCHITECTURES
METHOD_NAMES = ("kron", "select", "group-lasso", "elastic-group-lasso", "rigl", "iterative-pruning",
                "block-magnitude", "dense")
MODEL_NAMES = ("linear", "mlp", "lenet5", "vit", "vit-tiny", "gpt")
THREADS_HELP = ("1: on a machine busy with other jobs, OpenMP's spin-waiting made 2 threads 8-30x slower "
                "on these models (README, Training); OMP_WAIT_POLICY=PASSIVE softens that")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """Every option says what it means and its default (%(default)s); defaults are TrainConfig's."""
    from .training.config import TrainConfig

    d = TrainConfig.__dataclass_fields__
    p.add_argument("--method", default=d["method"].default, metavar="NAME",
                   help=f"training method: {', '.join(METHOD_NAMES)} (default: %(default)s)")
    p.add_argument("--model", default=d["model"].default, metavar="NAME",
                   help="linear (784->10, the paper's), mlp (784-300-100-10), lenet5, vit (hidden 64, 4 layers, "
                        "patch 7), vit-tiny (DeiT-tiny, inputs resized to 224 px) or gpt (a byte-level GPT, with "
                        "--dataset pycode) (default: %(default)s)")
    p.add_argument("--dataset", default=d["dataset"].default,
                   help="mnist, fashion-mnist, npz:PATH, or pycode (Python source, for --model gpt) "
                        "(default: %(default)s)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="folder holding mnist/ or fashion-mnist/ (default: $KRONSPARSE_DATA, then "
                        "~/.cache/kronsparse, downloading MNIST there if missing)")
    p.add_argument("--block", default="2x2", metavar="OUTxIN",
                   help="block shape in nn.Linear's (out, in) order; the paper's 16x2 is 2x16 (default: %(default)s)")
    p.add_argument("--rank", type=int, default=d["rank"].default,
                   help="Kronecker terms per layer, r in W = sum_i (S * A_i) kron B_i (default: %(default)s)")
    p.add_argument("--lambda", dest="lam", type=float, default=None, metavar="L",
                   help="fixed penalty strength instead of steering it to --target-sparsity "
                        "(default: 0, or steered when --target-sparsity is given)")
    p.add_argument("--target-sparsity", type=float, default=None, metavar="P",
                   help="fraction of zero blocks to reach, in [0, 1); steers lambda (default: none, then "
                        "sparsity comes only from --lambda)")
    p.add_argument("--optimizer", default=d["optimizer"].default, choices=("sgd", "adam", "adamw"),
                   help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d["lr"].default, help="learning rate (default: %(default)s)")
    p.add_argument("--momentum", type=float, default=d["momentum"].default,
                   help="SGD momentum (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=None, metavar="WD",
                   help="weight decay (default: 1e-3 on A and B for kron and select, 0 for the other methods)")
    p.add_argument("--scale-pin", default=d["scale_pin"].default, choices=SCALE_PINS,
                   help="kron: decay (weight decay on A) or norm (each block's A at unit norm, S "
                        "carrying its size); auto: decay on the linear model, norm on deeper ones (default: %(default)s)")
    p.add_argument("--factor-lr", type=float, default=None, metavar="X",
                   help="kron, select: learning rate of the factors A, B, S as a multiple of --lr "
                        "(default: 8 with adam/adamw on models deeper than one layer, else 1)")
    p.add_argument("--steering", default=d["steering"].default, choices=STEERINGS,
                   help="kron, group-lasso, elastic-group-lasso with a target: track (the threshold from the order "
                        "statistics of |S| or block norms), legacy (lambda from 1e-3, at most 1.05x per 10 steps), "
                        "prune (no penalty: gradual magnitude pruning on the same ramp) (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"].default, help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d["epochs"].default, help="(default: %(default)s)")
    p.add_argument("--sparsify-fraction", type=float, default=d["sparsify_fraction"].default, metavar="F",
                   help="share of training that sparsifies; then the mask is frozen and the learning rate "
                        "decays along a cosine (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="(default: %(default)s)")
    p.add_argument("--device", default=d["device"].default, help="cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: " + THREADS_HELP + ")")
    p.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=d["standardize"].default,
                   help="remove the train inputs' mean and divide by their std, as every README result "
                        "does (default: on)")
    p.add_argument("--path", default=d["path"].default, choices=("auto", "input_first", "factors_first", "materialize"),
                   help="KronLinear contraction order; auto picks the cheapest by the cost model (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=None, metavar="N",
                   help="use only the first N training samples (default: all)")
    p.add_argument("--n-test", type=int, default=None, metavar="N", help="use only the first N test samples (default: all)")
    p.add_argument("--candidates", default=None, metavar="BLOCKS",
                   help="block shapes for --method select, e.g. 2x2,2x8 (default: none)")
    _add_gpt_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (required)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (default: bars only when stderr is a terminal, none in a redirected log)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write a checkpoint to OUT/checkpoints every N steps (default: none)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT (default: off)")


def _add_gpt_args(p: argparse.ArgumentParser, experiment: bool = False) -> None:
    """The GPT's shape (--model gpt only); defaults are gpt.GPTSpec's, or the experiment's recipe."""
    for name, default, what in (("width", 128, "residual width"), ("layers", 4, "transformer blocks"),
                                ("heads", 4, "attention heads"), ("context", 128, "tokens per sequence")):
        shown = "the experiment's: 2 blocks with --quick, else 4" if name == "layers" and experiment else default
        p.add_argument(f"--{name}", type=int, default=None, metavar="N", help=f"gpt: {what} (default: {shown})")
    p.add_argument("--tokens-per-step", type=int, default=None, metavar="N",
                   help="gpt: tokens per optimizer step; sets --batch-size to N / context (default: "
                        "batch size x context)")


def batch_of_tokens(tokens: int | None, context: int | None, batch_size: int) -> int:
    """The batch size (sequences) that holds `tokens` tokens of `context` each; `batch_size` without it."""
    if tokens is None:
        return batch_size
    context = context or 128
    if tokens < context or tokens % context:
        raise UserError(f"--tokens-per-step {tokens} must be a positive multiple of the context ({context})")
    return tokens // context


def config_from_args(args: argparse.Namespace):
    """The TrainConfig of `kronsparse train`'s arguments."""
    from .training.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)} - {"candidates"}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["batch_size"] = batch_of_tokens(args.tokens_per_step, args.context, args.batch_size)
    values["block_shape"] = parse_block(args.block)
    values["candidates"] = _blocks(args.candidates) if args.candidates else None
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import train

    cfg = config_from_args(args)
    progress = not args.no_progress and sys.stderr.isatty()  # bars belong to a terminal, not a log
    metrics = train(cfg, out=args.out, progress=progress, checkpoint_every=args.checkpoint_every,
                    resume=args.resume)
    print_row(metrics)
    print(f"wrote {Path(args.out) / 'metrics.json'} and {Path(args.out) / 'model.safetensors'}")
    return 0


def print_row(metrics: dict) -> None:
    """The run as one markdown table row with its header (a language model's bits per byte for accuracy)."""
    keys = [k for k in ROW_KEYS if k in metrics]
    if "test_accuracy" not in metrics:
        keys[keys.index("block_sparsity"):keys.index("block_sparsity")] = ["val_bpb", "test_bpb"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    cells = []
    for key in keys:
        v = metrics[key]
        cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
    print("| " + " | ".join(cells) + " |")


def cmd_shapes(args: argparse.Namespace) -> int:
    if args.model is not None:
        return shapes_of_model(args)
    if args.in_features is None or args.out_features is None:
        raise UserError("give a layer (IN_FEATURES OUT_FEATURES) or a model (--model NAME)")
    for name in ("in_features", "out_features", "rank"):
        if getattr(args, name) < 1:
            raise UserError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(args, name)}")
    rows = plan_block_shapes(args.in_features, args.out_features, args.rank, bias=not args.no_bias)
    dense = layer_costs(args.in_features, args.out_features, (1, 1), 1, bias=not args.no_bias)
    print(f"layer {args.in_features} -> {args.out_features} (weight {args.out_features}x{args.in_features}), "
          f"rank {args.rank}; dense: {dense.dense_params} params, {dense.dense_macs} MACs/sample; "
          "every block shape that tiles the weight:")
    print("| block (out x in) | paper name (in x out) | train params | MACs/sample | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.block_shape[0]}x{r.block_shape[1]} | {r.paper_name} | {r.train_params} | {r.macs} | "
              f"{'fewest params' if r.best else ''} |")
    return 0


def shapes_of_model(args: argparse.Namespace) -> int:
    """`kronsparse.plan` on one of the command line's models: what each block shape and rank would
    cost it to train, per step of --batch samples."""
    import torch

    from .planner import OPTIMIZERS, plan
    from .training.gpt import GPTSpec
    from .training.models import ARCHITECTURES, build_model, dense_factory

    if args.model not in ARCHITECTURES:
        raise UserError(f"unknown model {args.model!r}; valid models: {', '.join(ARCHITECTURES)}")
    if args.batch < 1:
        raise UserError(f"--batch must be >= 1, got {args.batch}")
    if 4 * 784 * args.batch > limit("data_bytes"):  # the plan runs one forward of a batch of zeros
        raise UserError(f"--batch {args.batch} is over the limit {limit('data_bytes') // (4 * 784)} "
                        f"(raise {env_name('data_bytes')} knowingly)")
    if args.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown --optimizer {args.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    try:
        candidates = [parse_block(b) for b in args.blocks.split(",")]
        ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError as err:
        raise UserError(f"--blocks must be like 2x2,4x4 and --ranks like 1,2: {err}") from None
    if any(r < 1 for r in ranks):
        raise UserError(f"--ranks must be >= 1, got {args.ranks}")
    for r in ranks:
        if r > limit("rank"):
            raise UserError(f"--ranks {r} is over the limit {limit('rank')} (raise {env_name('rank')} knowingly)")
    if args.model == "gpt":  # its default shape (training/gpt.py); a batch is --batch sequences of its context
        context = GPTSpec().context
        model, example, unit = build_model("gpt", dense_factory, context), torch.zeros(args.batch, context), \
            f"sequences of {context} tokens"
    else:
        model, example, unit = build_model(args.model, dense_factory), torch.zeros(args.batch, 784), "samples"
    result = plan(model, example, candidates=candidates, ranks=ranks, optimizer=args.optimizer)
    print(f"model {args.model}, {args.batch} {unit} a step, {args.optimizer}; a block shape sparsifies the layers "
          "it tiles (fp32; peak: one training step's, predicted):")
    print(result.table())
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .experiments import reproduce

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be integers separated by commas, got {args.seeds!r}") from None
    overrides = {k: v for k, v in (("n_train", args.n_train), ("n_test", args.n_test), ("epochs", args.epochs),
                                   ("device", args.device), ("model", args.model)) if v is not None}
    gpt = {k: getattr(args, k) for k in ("width", "layers", "heads", "context", "tokens_per_step")
           if getattr(args, k) is not None}
    if gpt and args.experiment != "pycode-gpt":
        raise UserError(f"--{next(iter(gpt)).replace('_', '-')} is for pycode-gpt; {args.experiment} trains its own model")
    reproduce(args.experiment, args.out, seeds, quick=args.quick, jobs=args.jobs, overrides={**overrides, **gpt})
    print((Path(args.out) / "report.md").read_text())
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .training.sample import load_gpt, sample_text

    print(sample_text(load_gpt(args.run_dir), args.prompt, args.tokens, args.temperature, args.seed))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .training.run_folder import export_run

    path = export_run(args.run_dir, args.format, args.out)
    print(f"wrote {path} ({args.format})")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block); subcommand parsers inherit it."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kronsparse", description="Train block-sparse PyTorch models with Kronecker factors "
                     "(W = sum_i (S * A_i) kron B_i, an l1 proximal step on S zeroes whole blocks) and compare "
                     "them with the usual baselines.",
                     epilog="First run: kronsparse train --target-sparsity 0.6 --out runs/first (MNIST, the "
                            "paper's model); each command's --help lists its options and defaults.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train one model and write metrics.json + model.safetensors",
                       description="Train one model; writes OUT/metrics.json, OUT/config.json and "
                                   "OUT/model.safetensors and prints the result row.")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("shapes", help="every block shape of a layer with its training cost",
                       description="Every block shape that tiles a layer's weight, with its trainable "
                                   "parameters and multiply-adds per sample.")
    p.add_argument("in_features", type=int, nargs="?", help="the layer's inputs (nn.Linear's in_features), >= 1")
    p.add_argument("out_features", type=int, nargs="?", help="the layer's outputs (nn.Linear's out_features), >= 1")
    p.add_argument("--rank", type=int, default=1, help="Kronecker terms, >= 1 (default: %(default)s)")
    p.add_argument("--no-bias", action="store_true", help="count the layer without a bias (default: with)")
    p.add_argument("--model", default=None, help="instead of a layer, plan a model of `train` (linear, mlp, "
                   "lenet5, vit, vit-tiny, gpt): per block shape and rank, trainable parameters, optimizer state, "
                   "step multiply-adds and predicted peak memory against dense (default: none)")
    p.add_argument("--batch", type=int, default=64, help="with --model: samples per step (default: %(default)s)")
    p.add_argument("--blocks", default="2x2,2x16,4x4", help="with --model: block shapes (default: %(default)s)")
    p.add_argument("--ranks", default="1,2,4", help="with --model: ranks (default: %(default)s)")
    p.add_argument("--optimizer", default="sgd", help="with --model: adamw, adam, sgd or sgd-nomomentum, for "
                   "the optimizer state (default: %(default)s)")
    p.set_defaults(func=cmd_shapes)
    p = sub.add_parser("reproduce", help="the paper's comparison: every method, tables, plots, report",
                       description="Run the paper's comparison (every method, a sparsity sweep, ranks 1, 2, "
                                   "4) and write table.md, table.csv, report.md and three plots in OUT.")
    p.add_argument("experiment", help="mnist-linear, mnist-mlp, fashion-mnist-linear, fashion-vit or pycode-gpt")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder; started again there, it redoes only unfinished runs (required)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the main table (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="2 epochs, one seed, a short sweep (default: off)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, one thread each (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: 10, 2 with --quick)")
    p.add_argument("--n-train", type=int, default=None, metavar="N",
                   help="use only the first N training samples (default: all)")
    p.add_argument("--n-test", type=int, default=None, metavar="N", help="use only the first N test samples (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--model", default=None,
                   help="fashion-vit only: vit (hidden 64, 28 px; default) or vit-tiny (DeiT-tiny, 224 px)")
    _add_gpt_args(p, experiment=True)
    p.set_defaults(func=cmd_reproduce)
    p = sub.add_parser("sample", help="print text generated by a finished --model gpt run",
                       description="Rebuild a finished GPT run from its model.safetensors and print the prompt "
                                   "followed by sampled bytes.")
    p.add_argument("run_dir", help="a folder written by `kronsparse train --model gpt`")
    p.add_argument("--prompt", default="def ", help="text to continue (default: %(default)r)")
    p.add_argument("--tokens", type=int, default=200, help="bytes to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature, > 0 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("export", help="write a run's model as dense, BSR or factor tensors (safetensors)",
                       description="Write a finished run's model for inference as a safetensors file.")
    p.add_argument("run_dir", help="a folder written by `kronsparse train`")
    p.add_argument("--format", default="dense",
                   help="dense (loads into the original model), bsr (only the non-zero blocks) or factors "
                        "(S, A, B) (default: %(default)s)")
    p.add_argument("--out", default=None, help="output file (default RUN_DIR/model.FORMAT.safetensors)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .training.data import DataError

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

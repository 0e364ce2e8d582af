"""The training loop shared by every method, and the files a run writes."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf
from tqdm.auto import tqdm

from ..atomic import write_json, write_safetensors
from ..blocks import block_name, paper_block_name
from ..methods import get_method
from ..methods.select import PLOT_NAME, SelectMethod
from ..model_tree import layer_weight
from ..sparsifier import Sparsifier
from . import data as datamod
from . import run_folder, text
from .budget import check_training_memory
from .checkpoint import candidates as checkpoint_candidates
from .checkpoint import list_checkpoints, save_checkpoint
from .config import TrainConfig
from .gpt import GPTSpec
from .metrics import evaluate, sparsity_metrics, training_costs
from .models import LayerFactory, build_model, dense_factory, kron_factory, model_options, select_factory


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu or cuda") from None


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def layer_factory(cfg) -> LayerFactory:
    """The layers a run's model is built from: Kronecker layers for the methods that train factors
    (built with their own init, so the Sparsifier takes them as they are), dense ones otherwise."""
    method = get_method(cfg.method)
    if not method.trains_factors:
        return dense_factory
    if issubclass(method, SelectMethod):
        return select_factory(cfg.candidates, cfg.rank, cfg.path)
    return kron_factory(cfg.block_shape, cfg.rank, cfg.path)


def make_optimizer(cfg: TrainConfig, sparsifier: Sparsifier) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over the sparsifier's groups (Kronecker factors at their
    own lr); fused kernels where this torch has them for the device."""
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; valid optimizers: {', '.join(sorted(OPTIMIZERS))}")
    cls = OPTIMIZERS[cfg.optimizer]
    kw = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    try:  # one call over all tensors instead of a Python loop (KronLinear has 4 of them)
        return sparsifier.optimizer(cls, cfg.lr, fused=True, **kw)
    except (RuntimeError, TypeError, ValueError):
        return sparsifier.optimizer(cls, cfg.lr, foreach=True, **kw)


def method_options(cfg: TrainConfig, steps_per_epoch: int) -> dict:
    """The Sparsifier options a config means (each method takes the ones its Options know)."""
    values = {"target_sparsity": cfg.target_sparsity, "lam": cfg.lam, "sparsify_fraction": cfg.sparsify_fraction,
              "weight_decay": cfg.weight_decay, "seed": cfg.seed, "rank": cfg.rank, "scale_pin": cfg.scale_pin,
              "path": cfg.path, "candidates": cfg.candidates, "factor_lr": cfg.factor_lr, "steps_per_epoch": steps_per_epoch,
              "steering": cfg.steering}
    known = {f.name for f in dataclasses.fields(get_method(cfg.method).Options)}
    return {k: v for k, v in values.items() if k in known and v is not None}


def lr_factor(step: int, sparsify_steps: int, total_steps: int) -> float:
    """Constant while sparsifying (the prox threshold lr*lambda must not fade), then cosine to 0."""
    if step < sparsify_steps:
        return 1.0
    span = max(1, total_steps - sparsify_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - sparsify_steps) / span))


@functools.lru_cache(maxsize=2)
def _cached_dataset(spec: str, data_dir: str | None, standardize: bool) -> datamod.Dataset:
    """Datasets are read (and checksummed) once per process; nothing modifies them in place."""
    return datamod.load_dataset(spec, data_dir=data_dir, standardize=standardize)


def load_data(cfg: TrainConfig, device: torch.device) -> datamod.Dataset:
    """The run's dataset on `device`: images (standardised if asked), or a text corpus cut into windows of
    the GPT's context; --n-train / --n-test keep the first samples (windows; --n-test also of val)."""
    if cfg.dataset in text.TEXT_DATASETS:
        ds = text.load_text(cfg.dataset, cfg.context or GPTSpec().context, cfg.data_dir)
    else:
        ds = _cached_dataset(cfg.dataset, cfg.data_dir, cfg.standardize)
    if cfg.n_train is not None or cfg.n_test is not None:
        ds = datamod.subset(ds, cfg.n_train or len(ds.x_train), cfg.n_test or len(ds.x_test))
    keys = ("x_train", "y_train", "x_test", "y_test") + (("x_val", "y_val") if ds.x_val is not None else ())
    return dataclasses.replace(ds, **{k: getattr(ds, k).to(device) for k in keys})


def task_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier (N, C) against (N,), or of a language model (N, T, V) against (N, T)."""
    return nnf.cross_entropy(logits.flatten(0, -2), y.flatten())


class Run:
    """One training run: model, method, optimizer and the loop state."""

    def __init__(self, cfg: TrainConfig, ds: datamod.Dataset, device: torch.device) -> None:
        self.cfg, self.ds, self.device = cfg, ds, device
        torch.manual_seed(cfg.seed)
        self.steps_per_epoch = math.ceil(len(ds.x_train) / cfg.batch_size)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.model = build_model(cfg.model, layer_factory(cfg), ds.num_features, ds.num_classes, model_options(cfg))
        self.model.to(device)
        self.sparsifier = Sparsifier(self.model, cfg.method, block_shape=cfg.block_shape, total_steps=self.total_steps,
                                     layers=getattr(self.model, "sparsify_filter", None),  # vit: not its patch embedding
                                     **method_options(cfg, self.steps_per_epoch))
        self.method = self.sparsifier.method
        self.optimizer = make_optimizer(cfg, self.sparsifier)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.order: torch.Tensor | None = None  # this epoch's sample order, once drawn
        self.epoch_loss = 0.0
        self.history: list[dict] = []

    def train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        factor = lr_factor(self.step, self.method.sparsify_steps, self.total_steps)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        loss = task_loss(self.model(xb), yb)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss.item()} at step {self.step + 1}; "
                                     "lower the learning rate (the last checkpoint is kept)")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.sparsifier.step(self.optimizer)
        self.step += 1
        return loss.item()

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def train_epoch(self, progress: bool, on_step=None) -> dict:
        """Finish the current epoch (from wherever a resumed run stands), evaluate, record it."""
        epoch, first = self.epoch, self.step % self.steps_per_epoch
        if self.order is None:
            self.order = torch.randperm(len(self.ds.x_train), generator=self.generator)
        order = self.order.to(self.device)
        bar = tqdm(range(first, self.steps_per_epoch), desc=f"epoch {epoch + 1}/{self.cfg.epochs}",
                   leave=False, disable=not progress, unit="step")
        start = time.perf_counter()
        for i in bar:
            idx = order[i * self.cfg.batch_size: (i + 1) * self.cfg.batch_size]
            loss = self.train_step(self.ds.x_train[idx], self.ds.y_train[idx])
            self.epoch_loss += loss
            if i % 100 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")
            if on_step is not None and self.step % self.steps_per_epoch:
                on_step(self)
        record = {"epoch": epoch + 1, "train_loss": self.epoch_loss / self.steps_per_epoch,
                  "epoch_seconds": time.perf_counter() - start, **self.quick_eval()}
        self.history.append(record)
        self.order, self.epoch_loss = None, 0.0
        return record

    def state_dict(self) -> dict:
        """Everything needed to continue bit-identically on CPU."""
        return {"step": self.step, "order": self.order, "epoch_loss": self.epoch_loss,
                "history": self.history, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "sparsifier": self.sparsifier.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "config": self.cfg.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["config"] != self.cfg.to_dict():
            diff = sorted(k for k in state["config"] if state["config"][k] != self.cfg.to_dict().get(k))
            raise ValueError(f"the checkpoint was made with a different config (differs in: {', '.join(diff)})")
        # first: pattern selection may have removed candidates before the checkpoint
        self.sparsifier.load_state_dict(state["sparsifier"], self.optimizer)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.order, self.epoch_loss = state["step"], state["order"], state["epoch_loss"]
        self.history = state["history"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])

    def quick_eval(self) -> dict:
        self.model.eval()
        score = evaluate(self.model, self.ds, splits=("val",) if self.ds.x_val is not None else ("test",))
        self.model.train()
        scalars = {k: v for k, v in self.method.summary().items() if isinstance(v, (int, float, str))}
        return {**score, "block_sparsity": self.final_metrics_core()["block_sparsity"], **scalars}

    @torch.no_grad()
    def final_metrics_core(self) -> dict:
        layers = self.model.layers
        weights = [layer_weight(l).detach() for l in layers]
        idx = [k for k, l in enumerate(layers) if any(l is m for m in self.method.layers)]
        return sparsity_metrics(weights, [l.bias for l in layers], idx, self.method.block_shape,
                                getattr(self.model, "positions", None))


def train(cfg: TrainConfig, out: str | Path | None = None, progress: bool = True,
          checkpoint_every: int | None = None, resume: bool = False) -> dict:
    """Train `cfg`, write DIR/metrics.json, DIR/config.json and DIR/model.safetensors; return metrics.

    checkpoint_every: steps between checkpoints in DIR/checkpoints (the last two are kept);
    resume: continue from the newest checkpoint there (a finished run is not trained again).
    The folder is checked (a writable folder) and locked before anything is computed: a second
    process writing into it is refused. Sets torch's CPU threads to cfg.threads, 1 when it is None
    (see TrainConfig.threads).
    """
    if (checkpoint_every or resume) and out is None:
        raise ValueError("checkpoints and --resume need an output folder")
    if checkpoint_every is not None and not 1 <= checkpoint_every < 2**40:
        raise ValueError(f"--checkpoint-every must be in [1, 2**40), got {checkpoint_every}")
    try:
        if out is None:
            return _train(cfg, None, progress, checkpoint_every, resume)
        with run_folder.open_folder(out) as folder:
            return _train(cfg, folder, progress, checkpoint_every, resume)
    except FloatingPointError as err:
        raise _blame_divergence(err, cfg) from None


def _blame_divergence(err: FloatingPointError, cfg: TrainConfig) -> FloatingPointError:
    """A loss that is not finite at the first step, before any update, is the inputs' fault, not the lr's."""
    if "at step 1;" not in str(err):
        return err
    ds = _cached_dataset(cfg.dataset, cfg.data_dir, cfg.standardize)
    biggest = max(float(ds.x_train.abs().max()), float(ds.x_test.abs().max()))
    return FloatingPointError(f"the loss is not finite at step 1, before any update: the inputs reach "
                              f"|x| = {biggest:.3g}, too large for float32 arithmetic; scale them "
                              "(e.g. --standardize)" if biggest > 1e6 else str(err))


def _train(cfg: TrainConfig, out: Path | None, progress: bool, checkpoint_every: int | None,
           resume: bool) -> dict:
    torch.set_num_threads(cfg.threads or 1)  # see TrainConfig.threads: more threads spin-wait on a shared machine
    if resume and (done := finished_metrics(cfg, Path(out))) is not None:
        return done
    device = resolve_device(cfg.device)
    ds = load_data(cfg, device)
    check_training_memory(cfg, ds.num_features, ds.num_classes, len(ds.x_train))  # before the model exists
    run = Run(cfg, ds, device)
    state = None
    if resume:
        run, state = resume_run(run, out)
    if checkpoint_every and not resume:  # a fresh run: checkpoints of an earlier run must not mix in
        for old in list_checkpoints(out):
            old.unlink()
    start = time.perf_counter() - (state or {}).get("wall_seconds", 0.0)

    def checkpoint(r: Run) -> None:
        save_checkpoint(out, r.step, {**r.state_dict(), "wall_seconds": time.perf_counter() - start})

    on_step = None
    if checkpoint_every:
        def on_step(r: Run) -> None:
            if r.step % checkpoint_every == 0:
                checkpoint(r)
    epochs = tqdm(range(run.epoch, cfg.epochs), desc=f"{cfg.method} {block_name(cfg.block_shape)}",
                  disable=not progress, unit="epoch", initial=run.epoch, total=cfg.epochs)
    for _ in epochs:
        record = run.train_epoch(progress, on_step)
        score = {k: f"{v:.4f}" for k, v in record.items() if k in ("test_accuracy", "val_bpb")}
        epochs.set_postfix(**score, sparsity=f"{record['block_sparsity']:.3f}")
        if checkpoint_every:
            checkpoint(run)
    run.sparsifier.finalize(run.optimizer)
    metrics = final_metrics(run, time.perf_counter() - start)
    if out is not None:
        save_run(run, metrics, Path(out))
    return metrics


def finished_metrics(cfg: TrainConfig, out: Path) -> dict | None:
    """The metrics of a complete run in `out` (its manifest verified) if it was made with the same
    config; None if `out` holds no complete run (a torn or mixed folder is finished from checkpoints)."""
    if not (out / "metrics.json").exists():
        return None
    metrics = run_folder.finished_metrics(out)
    if metrics is None:
        _say(f"{out} holds no complete result (missing or mismatched manifest): resuming from its checkpoints")
        return None
    if metrics["config"] != cfg.to_dict():
        raise ValueError(f"{out} holds a finished run with a different config; choose another --out")
    return metrics


def resume_run(run: Run, out: Path) -> tuple[Run, dict | None]:
    """Load the newest checkpoint that passes its checksum and fits the run; fall back to older ones.

    A checkpoint of another config is refused (ValueError); a damaged one, or one whose tensors do
    not fit (missing keys, wrong shapes), is skipped with a message naming it.
    """
    failures = []
    for path, state in checkpoint_candidates(out):
        if isinstance(state, Exception):
            failures.append(str(state))
            continue
        theirs, ours = state.get("config"), run.cfg.to_dict()
        if theirs != ours:
            theirs = theirs if isinstance(theirs, dict) else {}
            diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            raise ValueError(f"the checkpoint was made with a different config (differs in: {', '.join(diff)})")
        try:
            run.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as err:
            failures.append(f"{path.name}: does not fit this run ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
            run = Run(run.cfg, run.ds, run.device)  # a clean run: the failed load may have changed it
            continue
        for failure in failures:
            _say(f"skipped checkpoint {failure}")
        _say(f"resumed from {path} (step {run.step})")
        return run, state
    if failures:
        raise ValueError(f"--resume: no checkpoint in {out / 'checkpoints'} could be used ({'; '.join(failures)})")
    _say(f"--resume: no checkpoint in {out / 'checkpoints'}; starting a fresh run")
    return run, None


def _say(message: str) -> None:
    print(f"kronsparse: {message}", file=sys.stderr)


def final_metrics(run: Run, wall_seconds: float) -> dict:
    cfg, ds = run.cfg, run.ds
    run.model.eval()
    m = {
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset,
        "block_shape": list(run.method.block_shape),
        "paper_block_name": paper_block_name(run.method.block_shape),
        "rank": cfg.rank, "epochs": cfg.epochs, "seed": cfg.seed,
        **evaluate(run.model, ds),
        **run.final_metrics_core(),
        **training_costs(run.model, cfg.batch_size),
        "sparsified_layers": [k for k, l in enumerate(run.model.layers) if any(l is m for m in run.method.layers)],
        "wall_seconds": wall_seconds,
        "mean_epoch_seconds": sum(h["epoch_seconds"] for h in run.history) / len(run.history),
        "input_mean": ds.input_mean, "input_std": ds.input_std,
        **run.method.summary(),
        "history": run.history,
        "torch_version": torch.__version__, "device": str(run.device), "threads": torch.get_num_threads(),
        "config": cfg.to_dict(),
    }
    return m


def save_run(run: Run, metrics: dict, out: Path) -> None:
    """The manifest is deleted first and written last: only a folder whose files all come from this
    run, written whole, is a complete run (run_folder.verify)."""
    tensors = run_folder.run_tensors(run.model, run.cfg.model)
    rest = getattr(run.model, "rest_tensors", None)  # gpt: embeddings and norms, so `kronsparse sample` can rebuild it
    if rest is not None:
        tensors.update({f"rest.{k}": v.detach().cpu().contiguous() for k, v in rest().items()})
    run_folder.unseal(out)
    write_json(out / "config.json", run.cfg.to_dict())
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt", "model": run.cfg.model})
    if isinstance(run.method, SelectMethod):  # its candidates' norms over training
        from .plots import group_norms  # matplotlib only where a picture is drawn

        group_norms(run.method.trace, run.method.steps_per_epoch, run.method.selected_at, out / PLOT_NAME)
    write_json(out / "metrics.json", metrics)
    run_folder.seal(out)

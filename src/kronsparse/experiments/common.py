"""What every experiment of `kronsparse reproduce` shares: the `Experiment` it is (its base config,
its plan of `Spec`s, its report; runner.py runs it) and the pieces its report is made of: reading
the runs back, mean and std over seeds, CSV, the label of a method and the `kronsparse train`
command that makes a run on its own.
"""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..blocks import block_name
from ..methods import get_method
from ..training import run_folder
from ..training.config import TrainConfig, flag
from ..training.models import resolve_scale_pin


@dataclass(frozen=True)
class Spec:
    """One run of the plan: its folder name, its config and the role it plays in the report."""

    name: str
    cfg: TrainConfig
    role: str  # e.g. "table", "sweep", "cost", "alone": what the report does with it


class Experiment:
    """What an experiment gives the pipeline (runner.reproduce_experiment): its base config, its plan
    and its report. A new experiment subclasses this in a module of its own and is named in
    experiments.EXPERIMENTS; `kronsparse reproduce NAME` then runs it."""

    name: str  # the name `kronsparse reproduce` takes
    fresh_process = False  # True: every run in a newly spawned process, its peak memory recorded

    def base_config(self, quick: bool, overrides: dict) -> TrainConfig:
        """The config every run starts from; `overrides` are the command line's (n_train, n_test,
        epochs, device, model): ValueError for one the experiment cannot take."""
        raise NotImplementedError

    def plan(self, seeds: list[int], quick: bool, base: TrainConfig) -> list[Spec]:
        """Every run, each with a name of its own (its folder in DIR/runs/); with `quick` one seed."""
        raise NotImplementedError

    def write_report(self, specs: list[Spec], out: Path) -> None:
        """table.md, table.csv and report.md in `out` (the command prints report.md), from the runs."""
        raise NotImplementedError


@dataclass(frozen=True)
class FunctionsExperiment(Experiment):
    """An experiment given by the three functions of its module (the ViT's and the GPT's)."""

    name: str
    make_base: Callable[[bool, dict], TrainConfig]  # (quick, overrides)
    make_plan: Callable[[list[int], TrainConfig], list[Spec]]  # (seeds, base): one seed when quick
    report: Callable[[list[Spec], Path], None]
    fresh_process: bool = False

    def base_config(self, quick: bool, overrides: dict) -> TrainConfig:
        return self.make_base(quick, overrides)

    def plan(self, seeds: list[int], quick: bool, base: TrainConfig) -> list[Spec]:
        return self.make_plan(seeds, base)

    def write_report(self, specs: list[Spec], out: Path) -> None:
        self.report(specs, out)


def memory_file(out: Path, name: str) -> Path:
    """Where a run's peak memory is kept: beside the runs, not in them (metrics.json stays deterministic)."""
    return out / "memory" / f"{name}.json"


def load_runs(specs: list[Spec], out: Path) -> list[dict]:
    """metrics.json of every spec, tagged with its role and its run's name."""
    return [{**run_folder.read_metrics(out / "runs" / spec.name), "role": spec.role, "run": spec.name}
            for spec in specs]


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_csv(rows: list[dict]) -> str:
    """The rows as CSV, every key a column (in order of first appearance)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table: the header, its rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def holds(ok: bool) -> str:
    return "holds" if ok else "does not hold"


def explicit_scale_pin(c: dict) -> str | None:
    """The scale pin of config `c` where it is not the one "auto" picks for its model, else None."""
    pin = c.get("scale_pin", "decay")  # configs written before "auto" existed say decay or norm
    return None if resolve_scale_pin(pin, c["model"]) == resolve_scale_pin("auto", c["model"]) else pin


def method_label(m: dict) -> str:
    """The method's table name: kron with the scale pin "auto" does not pick gets a row of its own."""
    pin = explicit_scale_pin(m["config"]) if m["method"] == "kron" else None
    return m["method"] + (f" (scale-pin {pin})" if pin else "")


def command_of(c: dict, recipe: tuple[str, ...] = ()) -> str:
    """The `kronsparse train` command that makes the run of config `c` on its own. `recipe`: the
    options an experiment sets for all its runs, always written (e.g. optimizer, lr, standardize)."""
    parts = ["kronsparse train", f"--method {c['method']}", f"--model {c['model']}", f"--dataset {c['dataset']}",
             f"--block {block_name(c['block_shape'])}", f"--rank {c['rank']}"]
    parts += [f"{flag(k)} {c[k]:g}" if isinstance(c[k], float) else f"{flag(k)} {c[k]}"
              for k in recipe if k != "standardize"]
    parts += [f"--epochs {c['epochs']}", f"--seed {c['seed']}"]
    if c.get("target_sparsity") is not None:
        parts.append(f"--target-sparsity {c['target_sparsity']:g}")
    if c.get("candidates"):
        parts.append("--candidates " + ",".join(block_name(b) for b in c["candidates"]))
    if not c.get("standardize", False):  # standardised inputs are the default
        parts.append("--no-standardize")
    elif "standardize" in recipe:
        parts.append("--standardize")
    if get_method(c["method"]).trains_factors and explicit_scale_pin(c):
        parts.append(f"--scale-pin {c['scale_pin']}")
    parts += [f"{flag(k)} {c[k]:g}" for k in ("lam", "factor_lr") if c.get(k) is not None]
    for key in ("n_train", "n_test"):
        if c.get(key):
            parts.append(f"{flag(key)} {c[key]}")
    if c.get("device", "cpu") != "cpu":
        parts.append(f"--device {c['device']}")
    return " ".join(parts) + " --out DIR"

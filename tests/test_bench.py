"""Smoke tests of the benchmark scripts: tiny grids run and write their results."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


def load_bench(path=BENCH):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tiny_grid_writes_json_and_markdown(tmp_path):
    bench = load_bench()
    stem = tmp_path / "cpu-test"
    bench.main(["--sizes", "16x8", "--blocks", "2x4", "--ranks", "2", "--tokens", "4", "--repeats", "2",
                "--warmup", "1", "--out", str(stem)])
    data = json.loads(stem.with_suffix(".json").read_text())
    assert {"torch", "dtype", "threads", "date", "device_name", "tf32_matmul"} <= set(data["meta"])
    variants = {(r["mode"], r["variant"]) for r in data["records"]}
    assert len(variants) == 3 * 7  # three modes x (three dense + four kron variants)
    dense = next(r for r in data["records"] if r["variant"] == "dense")
    assert dense["ratio_vs_dense"] == 1.0 and dense["saved_bytes"] > 0 and dense["state_bytes"] > 0
    assert "| 16x8 | 2x4 |" in stem.with_suffix(".md").read_text()


def test_whole_model_step_runs_the_method_and_writes_json(tmp_path):
    bench = load_bench(BENCH.with_name("bench_model_step.py"))
    out = tmp_path / "model-step.json"
    bench.main(["--models", "linear", "--blocks", "2x16", "--repeats", "3", "--warmup", "1", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "linear" and row["block_shape"] == [2, 16] and row["scale_pin"] == "decay"
    assert len(row["times_ms"]["kron"]) == len(row["times_ms"]["dense"]) == 3
    assert row["kron_over_dense"] == row["kron_ms"] / row["dense_ms"] > 0


def test_whole_model_step_at_a_later_phase(tmp_path):
    """--at times the steps of mid-training (the ramp), where the steering selects every step; --clock
    thread their CPU time."""
    bench = load_bench(BENCH.with_name("bench_model_step.py"))
    out = tmp_path / "model-step.json"
    bench.main(["--models", "linear", "--blocks", "2x2", "--repeats", "2", "--warmup", "1", "--at", "0.3", "--clock", "thread",
                "--threads", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["meta"]["at"] == data["rows"][0]["at"] == 0.3 and data["meta"]["clock"] == "thread"
    assert "from 30% of training on, thread CPU time" in out.with_suffix(".md").read_text()
    run = bench.make_run("kron", "linear", (2, 2), 2, 64, "cpu", bench.load_data(bench.TrainConfig(), torch.device("cpu")))
    bench.start_at(run, 0.3)
    assert run.step == run.sparsifier.steps > 0 and run.method.steering.schedule(run.sparsifier.steps) > 0  # ramping

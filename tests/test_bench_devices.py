"""Every benchmark takes --device (so one command measures everything on a GPU), and the inference
benchmark runs on a tiny layer and writes its JSON and markdown. Nothing here is timed."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = ["bench_train_step.py", "bench_model_step.py", "bench_memory.py", "bench_inference.py", "epoch_time.py",
           "selection_vs_separate.py"]


def load(name):
    spec = importlib.util.spec_from_file_location(Path(name).stem, BENCH / name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_takes_a_device(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True, check=True)
    assert "--device" in out.stdout


def test_calibration_takes_a_device():
    out = subprocess.run([sys.executable, str(BENCH / "calibrate_costs.py"), "measure", "--help"], capture_output=True,
                         text=True, check=True)
    assert "--device" in out.stdout


def test_inference_benchmark_writes_json_and_markdown(tmp_path):
    bench = load("bench_inference.py")
    stem = tmp_path / "inference"
    bench.main(["--size", "64x32", "--block", "4x4", "--rows", "1,8", "--repeats", "2", "--warmup", "1",
                "--out", str(stem)])
    rows = json.loads(stem.with_suffix(".json").read_text())["rows"]
    assert [r["rows"] for r in rows] == [1, 8]
    assert all(r["auto_choice"] in ("dense", "bsr", "input_first", "factors_first") for r in rows)
    assert "| 8 |" in stem.with_suffix(".md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inference_benchmark_on_cuda(tmp_path):
    load("bench_inference.py").main(["--size", "256x256", "--block", "16x16", "--rows", "1,64", "--repeats", "2",
                                     "--device", "cuda", "--out", str(tmp_path / "inference")])
    assert json.loads((tmp_path / "inference.json").read_text())["meta"]["device"] == "cuda"

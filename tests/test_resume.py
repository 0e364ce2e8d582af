"""Never lose a run: kill training at random points, resume, and get exactly the uninterrupted result."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kronsparse.atomic import atomic_write, write_text
from kronsparse.training.checkpoint import list_checkpoints, load_latest
from kronsparse.training.config import TrainConfig
from kronsparse.training.train import Run, train

ARGS = ["--block", "2x2", "--rank", "2", "--target-sparsity", "0.5", "--n-train", "2000", "--n-test", "500",
        "--epochs", "4", "--threads", "1", "--no-progress"]
TIMING = {"wall_seconds", "mean_epoch_seconds", "epoch_seconds"}


def comparable(metrics: dict) -> dict:
    """metrics.json without wall-clock fields."""
    out = {k: v for k, v in metrics.items() if k not in TIMING}
    out["history"] = [{k: v for k, v in h.items() if k not in TIMING} for h in metrics["history"]]
    return out


def cli(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "kronsparse", "train", *ARGS, "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for_progress(proc: subprocess.Popen, out: Path, last: int, timeout: float = 120.0) -> int:
    """Poll until a checkpoint newer than step `last` exists (or the process ends); its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [int(p.name[5:14]) for p in list_checkpoints(out)]
        if steps and max(steps) > last:
            return max(steps)
        time.sleep(0.02)
    return last


@pytest.mark.slow  # five training processes, ~20 s
def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_metrics(tmp_path):
    reference = cli(tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()
    expected = comparable(json.loads((tmp_path / "ref" / "metrics.json").read_text()))

    out, rng, kills, last = tmp_path / "killed", random.Random(0), 0, -1
    for _ in range(3):
        proc = cli(out, "--checkpoint-every", "7", "--resume")
        last = wait_for_progress(proc, out, last)  # kill only after the run made new progress
        time.sleep(rng.uniform(0.0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
    final = cli(out, "--checkpoint-every", "7", "--resume")
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()
    assert kills >= 1
    assert comparable(json.loads((out / "metrics.json").read_text())) == expected
    assert len(list_checkpoints(out)) == 2


def test_resume_in_process_after_an_exception_mid_epoch(tmp_path, monkeypatch):
    cfg = TrainConfig(block_shape=(2, 16), rank=2, target_sparsity=0.4, n_train=1500, n_test=300, epochs=3)
    expected = comparable(train(cfg, progress=False))

    calls = {"n": 0}
    original = Run.train_step

    def crash_at_step_40(self, xb, yb):
        calls["n"] += 1
        if calls["n"] == 40:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of epoch 2
        return original(self, xb, yb)

    monkeypatch.setattr(Run, "train_step", crash_at_step_40)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path, progress=False, checkpoint_every=5)
    assert load_latest(tmp_path)["step"] == 35
    monkeypatch.setattr(Run, "train_step", original)
    assert comparable(train(cfg, out=tmp_path, progress=False, checkpoint_every=5, resume=True)) == expected


def test_resume_refuses_a_different_config(tmp_path):
    cfg = TrainConfig(n_train=500, n_test=100, epochs=1, target_sparsity=0.3)
    train(cfg, out=tmp_path, progress=False, checkpoint_every=3)
    (tmp_path / "metrics.json").unlink()
    other = TrainConfig(n_train=500, n_test=100, epochs=1, target_sparsity=0.4)
    with pytest.raises(ValueError, match="differs in: target_sparsity"):
        train(other, out=tmp_path, progress=False, resume=True)


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    cfg = TrainConfig(n_train=500, n_test=100, epochs=1, target_sparsity=0.3)
    train(cfg, out=tmp_path, progress=False, checkpoint_every=3)
    older, newest = list_checkpoints(tmp_path)
    newest.write_bytes(newest.read_bytes()[:100])
    assert load_latest(tmp_path)["step"] == torch.load(older, weights_only=True)["step"]


def test_a_failed_write_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old")

    def half_then_crash(tmp):
        Path(tmp).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, half_then_crash)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_sigkill_during_a_write_never_leaves_a_truncated_file(tmp_path):
    """Killed while the write is demonstrably under way (the writer has written its first chunk and
    says so), never after a fixed sleep, which on a loaded machine can fire before the import ends."""
    target, started, finished = tmp_path / "big.bin", tmp_path / "started", tmp_path / "finished"
    code = ("import pathlib, time; from kronsparse.atomic import atomic_write\n"
            "def slow(tmp):\n"
            "    with open(tmp, 'wb') as f:\n"
            "        for k in range(2000):\n"
            "            f.write(b'x' * 100000); f.flush()\n"
            f"            if k == 0: pathlib.Path({str(started)!r}).touch()\n"
            "            time.sleep(0.01)\n"
            f"atomic_write({str(target)!r}, slow)\n"
            f"pathlib.Path({str(finished)!r}).touch()\n")
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert started.exists(), "the writer never started writing"
    time.sleep(0.05)  # a few more chunks: the file being written is now non-empty
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished.exists()  # killed mid-write (2000 chunks take > 20 s), not after it
    assert not target.exists()  # the rename never happened: no partial file under the real name


def test_divergence_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, capsys):
    from kronsparse.cli import main

    code = main(["train", *ARGS[:-1], "--epochs", "1", "--lr", "1e30", "--out", str(tmp_path), "--no-progress",
                 "--checkpoint-every", "1"])
    err = capsys.readouterr().err
    assert code == 3 and "at step 2" in err and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()
    assert load_latest(tmp_path)["step"] == 1  # the last good state is kept


def test_a_fresh_run_in_a_used_folder_does_not_mix_in_old_checkpoints(tmp_path):
    longer = TrainConfig(n_train=500, n_test=100, epochs=2, target_sparsity=0.3)
    train(longer, out=tmp_path, progress=False, checkpoint_every=3)
    shorter = TrainConfig(n_train=500, n_test=100, epochs=1, target_sparsity=0.3)
    train(shorter, out=tmp_path, progress=False, checkpoint_every=3)
    assert load_latest(tmp_path)["config"] == shorter.to_dict()


def test_the_same_tensors_give_the_same_safetensors_bytes_in_every_process(tmp_path):
    """safetensors writes the header's metadata in a per-process hash order; write_safetensors sorts it,
    so reruns of a run give byte-identical model files (and manifest hashes), and the file still reads
    back the same tensors and metadata."""
    code = ("import sys, torch; from kronsparse.atomic import write_safetensors\n"
            "write_safetensors(sys.argv[1], {'w': torch.arange(6.).view(2, 3), 'b': torch.ones(2)},"
            " {k: k * 3 for k in ('format', 'model', 'alpha', 'beta', 'gamma')})\n")
    files = [tmp_path / f"m{i}.safetensors" for i in range(4)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
    from safetensors import safe_open
    with safe_open(files[0], "pt") as f:
        assert f.metadata() == {k: k * 3 for k in ("format", "model", "alpha", "beta", "gamma")}
        assert torch.equal(f.get_tensor("w"), torch.arange(6.).view(2, 3)) and torch.equal(f.get_tensor("b"), torch.ones(2))

"""Hostile input and faults (issue 17): every attack below ends in one clear error, never a crash,
a hang, unbounded memory or a silently wrong result."""

import errno
import gzip
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kronsparse import KronLinear
from kronsparse.cli import main
from kronsparse.experiments import mnist as rep
from kronsparse.experiments.runner import check_identity
from kronsparse.export import ExportError, export_model
from kronsparse.functional import divisors
from kronsparse.training import run_folder as rundir
from kronsparse.training.checkpoint import list_checkpoints, load_latest, save_checkpoint
from kronsparse.training.config import TrainConfig
from kronsparse.training.data import DATASETS, TRAIN_IMAGES, DataError, load_npz, search_dirs
from kronsparse.training.models import FeedForward
from kronsparse.training.run_folder import load_model
from kronsparse.training.train import train

pytestmark = pytest.mark.filterwarnings("ignore:Sparse BSR tensor support is in beta")
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def kron_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = FeedForward([KronLinear(16, 8, (2, 2), rank=2), KronLinear(8, 4, (2, 2), rank=2)])
    with torch.no_grad():
        model.layers[0].S[::2, 1::2] = 0  # some exact zero blocks
    return model


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    model = kron_mlp()
    return {fmt: export_model(model, root / f"m.{fmt}.safetensors", fmt, "mlp") for fmt in ("dense", "bsr", "factors")}


def tampered(src: Path, dst: Path, change) -> Path:
    """A copy of an export with change(tensors, meta) applied, written as a well-formed safetensors file."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata()
    meta = json.loads(header["kronsparse"])
    change(tensors, meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst), metadata={**header, "kronsparse": json.dumps(meta)})
    return dst


def set_(key, index, value):
    def change(t, meta):
        t[key] = t[key].clone()
        t[key][index] = value
    return change


BSR = "layers.0.weight."
ATTACKS = {
    "crow far past nnz (was a segfault)": set_(BSR + "crow_indices", 2, 10**9),
    "crow decreasing": set_(BSR + "crow_indices", 1, -5),
    "col out of range": set_(BSR + "col_indices", 0, 10**6),
    "col negative": set_(BSR + "col_indices", -1, -1),
    "col repeated in a row": lambda t, m: t.__setitem__(BSR + "col_indices", torch.zeros_like(t[BSR + "col_indices"])),
    "values nan": set_(BSR + "values", 0, float("nan")),
    "values wrong shape": lambda t, m: t.__setitem__(BSR + "values", t[BSR + "values"][:, :1]),
    "values integer": lambda t, m: t.__setitem__(BSR + "values", t[BSR + "values"].to(torch.int32)),
    "indices float": lambda t, m: t.__setitem__(BSR + "crow_indices", t[BSR + "crow_indices"].double()),
    "missing tensor": lambda t, m: t.pop(BSR + "values"),
    "huge shape in metadata": lambda t, m: m["layers"]["layers.0"].__setitem__("shape", [2**20, 2**20]),
    "negative shape": lambda t, m: m["layers"]["layers.0"].__setitem__("shape", [-8, 16]),
    "block shape that does not tile": lambda t, m: m["layers"]["layers.0"].__setitem__("block_shape", [3, 2]),
    "layers not an object": lambda t, m: m.__setitem__("layers", [1, 2]),
    "unknown stored kind": lambda t, m: m["layers"]["layers.0"].__setitem__("stored", "pickle"),
    "alias to nothing": lambda t, m: m.__setitem__("aliases", {"x": "nope"}),
    "bias wrong shape": lambda t, m: t.__setitem__("layers.0.bias", torch.zeros(3)),
    "bias of another dtype": lambda t, m: t.__setitem__("layers.0.bias", t["layers.0.bias"].double()),
    "layers that do not chain": lambda t, m: m["layers"].__setitem__("layers.5", m["layers"].pop("layers.1")),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_tampered_bsr_export_raises_export_error(exports, tmp_path, attack):
    path = tampered(exports["bsr"], tmp_path / "t.safetensors", ATTACKS[attack])
    with pytest.raises(ExportError):
        load_model(path)


@pytest.mark.parametrize("fmt,key", [("dense", "layers.0.weight"), ("factors", "layers.0.A"),
                                     ("factors", "layers.1.S")])
def test_nan_or_integer_weights_are_refused(exports, tmp_path, fmt, key):
    with pytest.raises(ExportError, match="NaN"):
        load_model(tampered(exports[fmt], tmp_path / "n.safetensors", set_(key, 0, float("nan"))))
    to_int = lambda t, m: t.__setitem__(key, t[key].to(torch.int64))  # noqa: E731
    with pytest.raises(ExportError, match="dtype"):
        load_model(tampered(exports[fmt], tmp_path / "i.safetensors", to_int))


@FUZZ
@given(data=st.data())
def test_flipped_bytes_in_an_export_load_or_raise_export_error(exports, tmp_path, data):
    fmt = data.draw(st.sampled_from(sorted(exports)))
    raw = bytearray(exports[fmt].read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(bytes(raw))
    try:
        model = load_model(path)
    except (ExportError, FileNotFoundError):
        return
    y = model(torch.randn(3, 16))
    assert y.shape == (3, 4) and torch.isfinite(y).all()


def test_divisors_is_fast_and_exact():
    assert all(divisors(n) == [d for d in range(1, n + 1) if n % d == 0] for n in range(1, 500))
    start = time.perf_counter()
    assert divisors(1_000_000_007) == [1, 1_000_000_007]  # a prime: counted to n one by one, this never returned
    assert len(divisors(2**40)) == 41
    assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------------------------
# The command line: every mistake is one line and exit 2, before data is read or compute spent
# --------------------------------------------------------------------------------------------

TINY = ["--n-train", "300", "--n-test", "100", "--epochs", "1", "--no-progress", "--threads", "1"]


def one_line_error(capsys, argv, code=2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra, match", [
    (["--lambda", "nan"], "--lambda must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--device", "meta"], "unknown device 'meta'"),
    (["--rank", "100000"], "over the limit of 64 .*KRONSPARSE_MAX_RANK"),
    (["--n-train", "0"], "--n-train must be >= 1"),
    (["--epochs", "1000000000"], "epochs 1000000000 is over the limit"),
    (["--batch-size", "0"], "batch_size must be an integer >= 1"),
    (["--seed", "-1"], "seed must be an integer"),
    (["--momentum", "1.5"], "momentum must be in"),
    (["--checkpoint-every", "0"], r"--checkpoint-every must be in \[1, 2\*\*40\)"),
])
def test_bad_train_options_are_one_line_and_exit_2(capsys, tmp_path, extra, match):
    err = one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "o"), *extra])
    assert re.search(match, err), err
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_bad_output_folders_are_refused_before_training(capsys, tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "must name a folder" in one_line_error(capsys, ["train", *TINY, "--out", ""])
    assert "is a file, not a folder" in one_line_error(capsys, ["train", *TINY, "--out", str(a_file)])
    assert "cannot create" in one_line_error(capsys, ["train", *TINY, "--out", str(a_file / "sub")])
    (tmp_path / "blocked" / "metrics.json").mkdir(parents=True)
    assert "metrics.json is a folder" in one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "blocked")])
    (tmp_path / "blocked2").mkdir()
    (tmp_path / "blocked2" / "checkpoints").write_text("")
    assert "checkpoints is a file" in one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "blocked2")])
    calls = []
    monkeypatch.setattr("kronsparse.training.train.Run.__init__", lambda *a: calls.append(a))
    with rundir.open_folder(tmp_path / "busy"):  # another process holds it
        assert "in use by another kronsparse process (pid" in one_line_error(
            capsys, ["train", *TINY, "--out", str(tmp_path / "busy")])
    assert calls == []  # nothing was built


def test_read_only_and_full_disks_are_one_line(capsys, tmp_path, monkeypatch):
    def read_only(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", read_only)
        assert "Read-only file system" in one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "ro")])

    class Full:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("kronsparse.atomic.open", Full, raising=False)
    err = one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path / "full")])
    assert "No space left on device" in err
    assert not [p for p in (tmp_path / "full").iterdir() if p.name.endswith(".tmp")]


def test_shapes_and_reproduce_bounds(capsys, tmp_path):
    assert "rank must be >= 1" in one_line_error(capsys, ["shapes", "784", "10", "--rank", "-3"])
    assert "over the limit" in one_line_error(capsys, ["shapes", "1000000007", "10"])
    assert "--jobs 1000 is over the limit" in one_line_error(
        capsys, ["reproduce", "mnist-linear", "--quick", "--jobs", "1000", "--out", str(tmp_path / "r")])
    assert "--jobs must be >= 1" in one_line_error(
        capsys, ["reproduce", "mnist-linear", "--quick", "--jobs", "0", "--out", str(tmp_path / "r")])


def test_shapes_of_a_large_prime_returns_at_once(capsys, monkeypatch):
    monkeypatch.setenv("KRONSPARSE_MAX_FEATURES", str(2**31))
    start = time.perf_counter()
    assert main(["shapes", "1000000007", "10"]) == 0  # counted divisors to n one by one: never returned
    assert time.perf_counter() - start < 5
    assert "| 1x1000000007 |" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Data files
# --------------------------------------------------------------------------------------------


def npz(path, x_train=None, y_train=None, compressed=False, **more):
    x_train = np.ones((4, 3)) if x_train is None else x_train
    y_train = np.array([0, 1, 2, 1]) if y_train is None else y_train
    arrays = dict(x_train=x_train, y_train=y_train, x_test=np.ones((2, x_train.shape[1])), y_test=np.array([0, 1]))
    arrays.update(more)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def test_npz_sizes_and_labels_are_checked_before_loading(capsys, tmp_path):
    big = npz(tmp_path / "big.npz", np.zeros((10**6, 1000), np.uint8), np.zeros(10**6, np.int64), compressed=True)
    assert big.stat().st_size < 2 * 10**6  # 1 GB of zeros, 4 GB as float32: it peaked at 5.9 GB
    start = time.perf_counter()
    assert "over the 268435456-byte bound" in one_line_error(capsys, ["train", *TINY, "--dataset", f"npz:{big}",
                                                                       "--out", str(tmp_path / "o")])
    assert time.perf_counter() - start < 5
    for label in (10**6, 10**9):  # 10**9 classes: the "does not tile" message counted to 10**9
        path = npz(tmp_path / f"l{label}.npz", y_train=np.array([0, 1, 2, label]))
        assert f"makes {label + 1} classes, over the limit" in one_line_error(
            capsys, ["train", *TINY, "--dataset", f"npz:{path}", "--out", str(tmp_path / "o")])


def test_a_data_dir_that_is_a_symlink_loop_is_an_error(capsys, tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert "cannot use the data folder" in one_line_error(capsys, ["train", *TINY, "--data-dir", str(loop),
                                                                    "--out", str(tmp_path / "o")])


def test_huge_finite_inputs_are_blamed_on_the_inputs_not_the_lr(capsys, tmp_path):
    x = np.ones((64, 4), np.float32)
    x[:, 0] = 3e38
    path = npz(tmp_path / "huge.npz", x, np.arange(64) % 2)
    err = one_line_error(capsys, ["train", *TINY, "--no-standardize", "--dataset", f"npz:{path}", "--out", str(tmp_path / "o")],
                         code=3)
    assert "|x| = 3e+38" in err and "learning rate" not in err


# --------------------------------------------------------------------------------------------
# Checkpoints and run folders
# --------------------------------------------------------------------------------------------

CFG = TrainConfig(n_train=400, n_test=100, epochs=1, target_sparsity=0.3, threads=1)
TIMING = {"wall_seconds", "mean_epoch_seconds", "epoch_seconds"}


def comparable(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if k not in TIMING}
    out["history"] = [{k: v for k, v in h.items() if k not in TIMING} for h in metrics["history"]]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run with checkpoints every 2 steps (7 steps: checkpoints at 6 and 7 kept)."""
    out = tmp_path_factory.mktemp("ref")
    return out, comparable(train(CFG, out=out, progress=False, checkpoint_every=2))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "metrics.json").unlink()  # an interrupted run: only its checkpoints remain
    return dst


@FUZZ
@given(where=st.floats(0.0, 1.0), value=st.integers(0, 255))
def test_any_changed_byte_of_the_newest_checkpoint_falls_back_to_the_previous(reference, where, value):
    out, _ = reference
    older, newest = list_checkpoints(out)
    raw = newest.read_bytes()
    i = min(int(where * len(raw)), len(raw) - 1)
    if raw[i] == value:
        return
    try:
        newest.write_bytes(raw[:i] + bytes([value]) + raw[i + 1:])
        assert load_latest(out)["step"] == int(older.name[5:14])
    finally:
        newest.write_bytes(raw)


def test_resume_after_a_flipped_byte_or_a_non_fitting_checkpoint_gives_the_uninterrupted_metrics(
        reference, tmp_path, capsys):
    out, expected = reference
    flipped = copy_run(out, tmp_path / "flipped")
    newest = list_checkpoints(flipped)[-1]
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # inside a tensor: loaded and resumed with different metrics before
    newest.write_bytes(bytes(raw))
    assert comparable(train(CFG, out=flipped, progress=False, checkpoint_every=2, resume=True)) == expected
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "resumed from" in err and "step-000000006" in err

    first = lambda s: next(iter(s["model"]))  # noqa: E731
    for name, change in {"missing key": lambda s: s["model"].pop(first(s)),
                         "wrong shape": lambda s: s["model"].__setitem__(first(s), torch.zeros(3, 3)),
                         "not a dict": lambda s: s.__setitem__("model", [1, 2])}.items():
        bad = copy_run(out, tmp_path / name.replace(" ", "-"))
        state = load_latest(bad)
        change(state)
        save_checkpoint(bad, 8, state)  # valid checksum, newest, but does not fit the run
        assert comparable(train(CFG, out=bad, progress=False, checkpoint_every=2, resume=True)) == expected, name
        assert "does not fit this run" in capsys.readouterr().err


def test_resume_says_when_there_is_no_checkpoint(tmp_path, capsys):
    train(CFG, out=tmp_path, progress=False, resume=True)
    err = capsys.readouterr().err
    assert "--resume: no checkpoint in" in err and "starting a fresh run" in err


def test_torn_or_mixed_folders_are_detected(reference, tmp_path, capsys, monkeypatch):
    """Killed between the renames of model.safetensors and metrics.json in a reused folder: one run's
    metrics beside another run's weights. Export refuses it; --resume does not return the stale metrics."""
    out, expected = reference
    folder = tmp_path / "reused"
    shutil.copytree(out, folder)
    other = TrainConfig(**{**CFG.to_dict(), "block_shape": (2, 16), "seed": 1})
    real = rundir.seal

    def killed_before_sealing(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "seal", killed_before_sealing)
    monkeypatch.setattr("kronsparse.training.train.write_json", lambda p, o: None if p.name == "metrics.json" else
                        __import__("kronsparse.atomic", fromlist=["write_json"]).write_json(p, o))
    with pytest.raises(KeyboardInterrupt):
        train(other, out=folder, progress=False)  # its model.safetensors replaced, its metrics.json not
    monkeypatch.setattr(rundir, "seal", real)
    monkeypatch.undo()
    assert json.loads((folder / "metrics.json").read_text())["config"] == CFG.to_dict()  # the stale metrics
    assert "holds no complete run" in one_line_error(capsys, ["export", str(folder)])
    resumed = train(CFG, out=folder, progress=False, checkpoint_every=2, resume=True)
    assert comparable(resumed) == expected and "holds no complete result" in capsys.readouterr().err
    rundir.verify(folder)  # whole again, and all of one run

    (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8] + b"\0" * 8)
    assert "not the file its manifest lists" in one_line_error(capsys, ["export", str(folder)])
    for bad in ("{}", "[1, 2]"):
        (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        (folder / "metrics.json").write_text(bad)
        assert "manifest" in one_line_error(capsys, ["export", str(folder)])
        rundir.seal(folder)  # even sealed, a metrics.json that is not a run's is refused
        assert "needs 'model' and 'block_shape'" in one_line_error(capsys, ["export", str(folder)])
    assert "is a folder" in one_line_error(capsys, ["export", str(out), "--out", str(tmp_path)])


def test_files_have_one_mode_and_stale_temporaries_go(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / ".model.safetensors.x1.tmp", tmp_path / "checkpoints" / ".step-000000001-ab.pt.y2.tmp"]
    for p in stale:
        p.write_bytes(b"left by a kill")
    train(CFG, out=tmp_path, progress=False, checkpoint_every=4)
    assert not any(p.exists() for p in stale)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes  # model.safetensors was 0600


def test_two_train_processes_on_one_folder(tmp_path, capsys):
    """Both exited 0 and one result was lost; now the second is refused at once, and a killed holder
    leaves no stale lock behind."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "kronsparse", "train", "--n-train", "3000", "--epochs", "100",
                              "--no-progress", "--threads", "1", "--out", str(tmp_path)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / ".lock").exists() or not (tmp_path / ".lock").read_text().strip():
            assert time.monotonic() < deadline and first.poll() is None, first.stderr.read().decode()
            time.sleep(0.05)
        err = one_line_error(capsys, ["train", *TINY, "--out", str(tmp_path)])
        assert f"in use by another kronsparse process (pid {first.pid})" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main(["train", *TINY, "--out", str(tmp_path)]) == 0  # the kernel dropped the dead holder's lock
    rundir.verify(tmp_path)


def test_reproduce_never_reuses_runs_made_with_other_settings(tmp_path):
    base = TrainConfig(epochs=1, n_train=300, n_test=100, standardize=True)
    specs = rep.plan(rep.EXPERIMENTS["mnist-linear"], [0], True, base)
    spec = specs[0]
    train(spec.cfg, out=tmp_path / "runs" / spec.name, progress=False)
    check_identity(specs, tmp_path)  # the same settings: reused
    longer = rep.plan(rep.EXPERIMENTS["mnist-linear"], [0], True, TrainConfig(**{**base.to_dict(), "epochs": 2}))
    with pytest.raises(rundir.RunFolderError, match="made with other settings .*epochs 1 there, 2 here"):
        check_identity(longer, tmp_path)
    more = rep.plan(rep.EXPERIMENTS["mnist-linear"], [0], True, TrainConfig(**{**base.to_dict(), "n_train": 400}))
    with pytest.raises(rundir.RunFolderError, match="n_train 300 there, 400 here"):
        check_identity(more, tmp_path)
    (tmp_path / "runs" / spec.name / "manifest.json").unlink()  # torn: redone, not reused nor refused
    check_identity(longer, tmp_path)


def _children(pid: int) -> list[int]:
    kids = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            kids.append(int(d))
    return kids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_reproduce_workers_die_with_their_parent(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-m", "kronsparse", "reproduce", "mnist-linear", "--quick",
                               "--n-train", "200", "--n-test", "100", "--jobs", "2", "--out", str(tmp_path)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(_children(parent.pid)) < 2:
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    workers = _children(parent.pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(map(_running, workers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [w for w in workers if _running(w)]
    for w in alive:  # do not leave them behind if the test fails
        os.kill(w, signal.SIGKILL)
    assert alive == []


# --------------------------------------------------------------------------------------------
# Done means: under `ulimit -v 4000000`, no attack runs over 20 s, prints a traceback or crashes
# --------------------------------------------------------------------------------------------

DRIVER = r"""
import contextlib, io, json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (4_000_000 * 1024, 4_000_000 * 1024))  # ulimit -v 4000000
from kronsparse.cli import main
from kronsparse.training.run_folder import load_model
for argv in json.loads(sys.argv[1]):
    err, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv) if argv[0] != "load_model" else (load_model(argv[1]), 0)[1]
        except SystemExit as e:
            code = e.code
        except Exception as e:
            code = f"{type(e).__name__}: {e}"
    print(json.dumps([argv, code, time.perf_counter() - start, err.getvalue()]), flush=True)
"""


def test_every_attack_under_a_4_gb_address_space_limit(exports, tmp_path):
    big = npz(tmp_path / "big.npz", np.zeros((10**6, 1000), np.uint8), np.zeros(10**6, np.int64), compressed=True)
    label = npz(tmp_path / "label.npz", y_train=np.array([0, 1, 2, 10**9]))
    segv = tampered(exports["bsr"], tmp_path / "segv.safetensors", ATTACKS["crow far past nnz (was a segfault)"])
    out = str(tmp_path / "o")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    attacks = [["train", *TINY, "--dataset", f"npz:{big}", "--out", out],
               ["train", *TINY, "--dataset", f"npz:{label}", "--out", out],
               ["train", *TINY, "--rank", "100000", "--out", out],
               ["train", *TINY, "--lambda", "nan", "--out", out],
               ["train", *TINY, "--out", str(a_file)],
               ["shapes", "1000000007", "10"],
               ["shapes", "784", "10", "--rank", "-3"],
               ["reproduce", "mnist-linear", "--quick", "--jobs", "1000", "--out", out],
               ["export", str(tmp_path), "--format", "bsr"],
               ["load_model", str(segv)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(attacks)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(attacks)
    for argv, code, seconds, err in results:
        if argv[0] == "load_model":
            assert code.startswith("ExportError:"), (argv, code)
            continue
        assert code == 2 and seconds < 20 and err.count("\n") == 1 and "Traceback" not in err, (argv, code, err)


# --------------------------------------------------------------------------------------------
# Sizes a small file or a few options can ask for
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, extra, match", [
    ((1, 10**7), ["--model", "mlp"], r"about 89\.\d GiB \(3000030501 parameters"),  # a 3e9-weight first layer
    ((1, 10**7), ["--block", "1x1", "--rank", "64"], "rank 64"),
    ((2, 2048 * 2048), ["--model", "lenet5", "--block", "1x1"], "activations per batch"),
])
def test_models_too_large_for_memory_are_refused_before_they_exist(capsys, tmp_path, shape, extra, match):
    x = np.zeros(shape, np.float32)
    x[0, 0] = 1.0
    path = npz(tmp_path / "wide.npz", x, np.arange(shape[0]) % 2, x_test=x[:1], y_test=np.array([0]))
    err = one_line_error(capsys, ["train", *TINY, "--dataset", f"npz:{path}", *extra, "--out", str(tmp_path / "o")])
    assert "over the limit" in err and "KRONSPARSE_MAX_TRAIN_BYTES" in err and re.search(match, err), err


def test_unsigned_labels_past_int64_are_refused_before_the_cast(capsys, tmp_path):
    path = npz(tmp_path / "u64.npz", y_train=np.array([2**63 + 5] * 4, dtype=np.uint64))
    assert "classes, over the limit" in one_line_error(capsys, ["train", *TINY, "--dataset", f"npz:{path}",
                                                                 "--out", str(tmp_path / "o")])


def test_reproduce_seeds_that_are_not_integers(capsys, tmp_path):
    assert "--seeds must be integers" in one_line_error(capsys, ["reproduce", "mnist-linear", "--seeds", "a,b",
                                                                 "--out", str(tmp_path)])


NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), st.none())


@FUZZ
@given(st.fixed_dictionaries({}, optional={k: NUMBERS for k in (
    "rank", "lam", "target_sparsity", "lr", "momentum", "weight_decay", "batch_size", "epochs",
    "sparsify_fraction", "seed", "threads", "n_train", "n_test")}))
def test_any_numbers_make_a_valid_config_or_a_value_error(values):
    try:
        cfg = TrainConfig(**values)
    except (ValueError, TypeError):
        return
    assert 1 <= cfg.rank <= 64 and 1 <= cfg.epochs and 1 <= cfg.batch_size and 0 <= cfg.seed < 2**63
    assert math.isfinite(cfg.lr) and cfg.lr > 0 and 0 <= cfg.momentum < 1
    assert cfg.n_train is None or cfg.n_train >= 1
    assert cfg.threads is None or cfg.threads >= 1


@FUZZ
@given(n=st.integers(0, 5), f=st.integers(0, 4), dtype=st.sampled_from(["u1", "i8", "u8", "f2", "f4", "f8", "c8", "?"]),
       labels=st.lists(st.integers(-3, 2**64 - 1), min_size=0, max_size=5),
       label_dtype=st.sampled_from(["i8", "u8", "f8", "i1"]))
def test_any_small_npz_loads_or_raises_data_error(tmp_path, n, f, dtype, labels, label_dtype):
    try:
        y = np.array(labels, dtype=label_dtype)
    except (OverflowError, ValueError):
        return
    path = tmp_path / "h.npz"
    np.savez(path, x_train=np.ones((n, f), dtype), y_train=y, x_test=np.ones((1, f), dtype), y_test=np.zeros(1, int))
    try:
        ds = load_npz(path)
    except DataError:
        return
    assert ds.y_train.min() >= 0 and ds.num_classes <= 100_000 and torch.isfinite(ds.x_train).all()


def test_a_gzip_bomb_under_a_registered_name_stops_early(capsys, tmp_path):
    real = next(d for d in search_dirs("mnist") if (d / TRAIN_IMAGES).is_file())
    bomb = tmp_path / "mnist"
    bomb.mkdir()
    for name in DATASETS["mnist"].sha256:
        (bomb / name).symlink_to((real / name).resolve())
    (bomb / TRAIN_IMAGES).unlink()
    with gzip.open(bomb / TRAIN_IMAGES, "wb", compresslevel=1) as f:
        for _ in range(80):
            f.write(bytes(2**20))  # 80 MiB of zeros in 80 KB; the checksum pass stops after 64 MiB
    start = time.perf_counter()
    err = one_line_error(capsys, ["train", *TINY, "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "decompresses to more than 67108864 bytes" in err and time.perf_counter() - start < 10


def test_the_dense_weights_an_export_builds_are_bounded_in_total(exports, monkeypatch):
    """A 66 KB BSR file of empty blocks may claim layers whose dense weights take gigabytes."""
    load_model(exports["bsr"])  # 16*8 + 8*4 = 160 elements
    monkeypatch.setenv("KRONSPARSE_MAX_TENSOR_ELEMENTS", "150")
    with pytest.raises(ExportError, match="factor layers, all together, has 160 elements, over the limit of 150"):
        load_model(exports["bsr"])


def test_a_fifo_never_blocks_a_loader(capsys, tmp_path, reference):
    fifo = tmp_path / "d.npz"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(capsys, ["train", *TINY, "--dataset", f"npz:{fifo}",
                                                            "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        load_model(fifo)
    out, _ = reference
    trap = out / "checkpoints" / ("step-999999999-" + "0" * 64 + ".pt")
    os.mkfifo(trap)
    try:
        assert load_latest(out)["step"] == 7  # the FIFO named like the newest checkpoint is not opened
    finally:
        trap.unlink()

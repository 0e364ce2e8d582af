"""The run folder of `kronsparse train`, its one owner: checked before any compute is spent, locked
while in use, sealed by a manifest; its model.safetensors written and read here.

- `open_folder(out)` refuses an empty name, a file, or a folder that cannot be created or written,
  then takes an exclusive lock (`DIR/.lock`, flock: the kernel drops it when the process dies, so
  a kill never leaves a stale lock) and deletes temporary files left by killed writes.
- `seal(folder, files)` writes `manifest.json` last: the sha256 of every result file. `unseal`
  deletes it before new results are written, so a folder killed halfway has no manifest, and a
  folder whose files come from two runs fails `verify`.
- model.safetensors (`run_tensors` writes what `run_entries` and `layer_weights` read):
  `layers.K.weight`/`.bias` dense with their exact zero blocks and `layers.K.kron.S`/`.A`/`.B` for
  Kron layers; for the one-layer "linear" model K is dropped (`weight`, `bias`, `kron.S`, ...:
  `run_key` is the only place that knows).
- `export_run` writes a run as an export file (kronsparse.export); `load_model` rebuilds the run's
  model (linear, mlp, lenet5) from such a file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

from safetensors.torch import load_file
from torch import Tensor, nn

from ..atomic import remove_stale_temporaries, write_json
from ..export import ExportError, LayerEntry, _first_line, _is_ints, check_format, read_export, write_export
from ..inference import layers_from_export
from ..layers import KRON_LAYERS
from ..model_tree import layer_weight
from .models import FeedForward, LeNet5

LOCK = ".lock"
MANIFEST = "manifest.json"
RESULT_FILES = ("config.json", "model.safetensors", "metrics.json")


class RunFolderError(ValueError):
    """An output folder that cannot be used, is in use, or holds an incomplete or mixed result."""


def check_out(out, what: str = "--out") -> Path:
    """The folder `out`, created if needed; RunFolderError unless it is a writable folder."""
    if out is None or not str(out).strip():
        raise RunFolderError(f"{what} must name a folder, got {str(out)!r}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{what} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunFolderError(f"{what} {path}: cannot create the folder ({err.strerror or err})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise RunFolderError(f"{what} {path}: the folder is not writable")
    for name in (*RESULT_FILES, MANIFEST, LOCK):  # found out only after training, otherwise
        if (path / name).is_dir():
            raise RunFolderError(f"{what} {path}: {name} is a folder; the run writes a file there")
    if (path / "checkpoints").exists() and not (path / "checkpoints").is_dir():
        raise RunFolderError(f"{what} {path}: checkpoints is a file; the run keeps its checkpoints in a folder there")
    return path


class FolderLock:
    """An exclusive, non-blocking lock on DIR/.lock; the file holds the owner's pid for the message."""

    def __init__(self, folder: Path, what: str = "--out") -> None:
        self.folder, self.fd = folder, None
        try:
            self.fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # read-only file system, permissions
            raise RunFolderError(f"{what} {folder}: cannot write in the folder ({err.strerror or err})") from None
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            self.fd = None
            if err.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunFolderError(f"{what} {folder} is in use by another kronsparse process (pid {owner}); "
                                     "wait for it to end or choose another folder") from None
            raise
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (deleting it would race)
            self.fd = None


@contextlib.contextmanager
def open_folder(out, what: str = "--out") -> Iterator[Path]:
    """Check `out`, lock it for this process and clean what killed writers left behind."""
    folder = check_out(out, what)
    lock = FolderLock(folder, what)
    try:
        for sub in (folder, folder / "checkpoints"):
            if sub.is_dir():
                remove_stale_temporaries(sub)
        yield folder
    finally:
        lock.release()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def unseal(folder) -> None:
    """Delete the manifest before results are (re)written: until sealed again, the folder is unfinished."""
    path = Path(folder) / MANIFEST
    if path.exists():
        path.unlink()
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def seal(folder, files=RESULT_FILES) -> dict:
    """Write manifest.json, last: a run id and the sha256 of every result file."""
    folder = Path(folder)
    manifest = {"run_id": uuid.uuid4().hex, "files": {name: _sha256(folder / name) for name in files}}
    write_json(folder / MANIFEST, manifest)
    return manifest


def verify(folder) -> dict:
    """The manifest of a complete run; RunFolderError saying what is wrong otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise RunFolderError(f"{folder} holds no complete run (no {MANIFEST}: unfinished, interrupted while "
                             "writing its results, or written by kronsparse before 0.1 manifests)")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        assert isinstance(files, dict) and set(RESULT_FILES) <= set(files)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError):
        raise RunFolderError(f"{path} is damaged") from None
    for name, digest in files.items():
        target = folder / name
        if not target.is_file():
            raise RunFolderError(f"{folder}: {name} is missing (its manifest lists it)")
        if _sha256(target) != digest:
            raise RunFolderError(f"{folder}: {name} is not the file its manifest lists (changed, damaged, or "
                                 "written by another run): a torn or mixed folder")
    return manifest


def finished_metrics(folder) -> dict | None:
    """metrics.json of the complete run in `folder`, or None when there is none or it is torn."""
    try:
        verify(folder)
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    except (RunFolderError, ValueError, OSError):
        return None
    return metrics if isinstance(metrics, dict) and isinstance(metrics.get("config"), dict) else None


def read_metrics(folder) -> dict:
    """metrics.json of the run in `folder`, as it is (the caller knows the run is finished)."""
    return json.loads((Path(folder) / "metrics.json").read_text())


def run_entries(run_dir) -> tuple[list[LayerEntry], str, tuple[int, int]]:
    """The weight layers of a finished `kronsparse train` run, read from its files."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} {'is not a folder' if run_dir.exists() else 'does not exist'}")
    metrics_path, weights_path = run_dir / "metrics.json", run_dir / "model.safetensors"
    if not metrics_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{run_dir} holds no finished run (metrics.json and model.safetensors are needed)")
    verify(run_dir)  # every file of one complete run: a torn or mixed folder is refused
    try:
        metrics = json.loads(metrics_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{metrics_path} is not JSON ({_first_line(err)})") from None
    if not (isinstance(metrics, dict) and isinstance(metrics.get("model"), str) and _is_ints(metrics.get("block_shape"), 2)
            and isinstance(metrics.get("sparsified_layers", []), list)):
        raise ExportError(f"{metrics_path}: needs 'model' and 'block_shape' (a metrics.json of `kronsparse train`)")
    model, block_shape = metrics["model"], tuple(metrics["block_shape"])
    try:
        t = load_file(str(weights_path))
    except Exception as err:
        raise ExportError(f"{weights_path}: not a readable safetensors file ({_first_line(err)})") from None
    if model not in ("linear", "mlp", "lenet5") or not any(k in t for k in ("weight", "layers.0.weight")):
        raise ExportError(f"{run_dir}: model {model!r} with tensors {sorted(t)[:4]} is not a run of `kronsparse train`")
    count = _layer_count(model, t)
    padding = _conv_padding(model)
    entries = []
    for k in range(count):
        name = run_key(model, k, "weight").removesuffix("weight").removesuffix(".")
        if run_key(model, k, "weight") not in t:
            raise ExportError(f"{run_dir}: layers of model {model!r} are not numbered 0..{count - 1}")
        e = LayerEntry(name, t[run_key(model, k, "weight")], t.get(run_key(model, k, "bias")),
                       block_shape if k in metrics.get("sparsified_layers", []) else None)
        kron = {f: t[run_key(model, k, f"kron.{f}")] for f in ("S", "A", "B") if run_key(model, k, f"kron.{f}") in t}
        e.factors = kron or None
        if e.weight.dim() == 4:
            e.padding = padding[k]
        entries.append(e)
    return entries, model, block_shape


def _key(name: str, leaf: str) -> str:
    return f"{name}.{leaf}" if name else leaf


def run_key(model_name: str, k: int, leaf: str) -> str:
    """The key of layer k's `leaf` ("weight", "bias", "kron.S", ...) in a run's model.safetensors."""
    return _key("" if model_name == "linear" else f"layers.{k}", leaf)


def _layer_count(model_name: str, tensors: dict) -> int:
    """How many layers a run's model.safetensors holds (the one-layer "linear" model's keys have no index)."""
    return 1 if model_name == "linear" else len({k.split(".")[1] for k in tensors if k.startswith("layers.")})


def run_tensors(model: nn.Module, model_name: str) -> dict[str, Tensor]:
    """What a run's model.safetensors holds: every layer's dense weight and bias, the factors of its
    Kron layers (contiguous, on the CPU). Numbers anyone recomputes come from these weights."""
    state = {}
    for k, layer in enumerate(model.layers):
        state[run_key(model_name, k, "weight")] = layer_weight(layer)
        if layer.bias is not None:
            state[run_key(model_name, k, "bias")] = layer.bias
        if isinstance(layer, KRON_LAYERS):
            for f in ("S", "A", "B"):
                state[run_key(model_name, k, f"kron.{f}")] = getattr(layer, f)
    return {key: v.detach().cpu().contiguous() for key, v in state.items()}


def _conv_padding(model: str) -> tuple:
    return LeNet5.conv_padding if model == "lenet5" else ()


def export_run(run_dir, fmt: str = "dense", out=None) -> Path:
    """Export a run folder as `fmt`; out defaults to RUN_DIR/model.FMT.safetensors."""
    check_format(fmt)
    entries, model, block_shape = run_entries(run_dir)
    out = Path(out) if out is not None else Path(run_dir) / f"model.{fmt}.safetensors"
    if out.is_dir() or not out.name:
        raise ExportError(f"--out {out} is a folder; give the file to write, e.g. {out / f'model.{fmt}.safetensors'}")
    if out.resolve().parent == Path(run_dir).resolve() and out.name in (*RESULT_FILES, MANIFEST):
        raise ExportError(f"--out {out} would overwrite the run's own {out.name}")
    return write_export(out, entries, {}, fmt, model, block_shape)


def layer_weights(run_dir, model_name: str) -> list[Tensor]:
    """The dense weight of every layer of a run's model.safetensors, in order (exact zero blocks)."""
    t = load_file(str(Path(run_dir) / "model.safetensors"))
    return [t[run_key(model_name, k, "weight")] for k in range(_layer_count(model_name, t))]


def load_model(path, representation: str = "auto") -> nn.Module:
    """A runnable model from the export of a `kronsparse train` run (linear, mlp or lenet5)."""
    meta, tensors = read_export(path)
    layers = layers_from_export(meta, tensors, representation)
    if meta["model"] in ("linear", "mlp"):
        names = sorted(layers, key=lambda n: int(n.split(".")[1]) if n.startswith("layers.") and
                       n.split(".")[1].isdigit() else -1)
        expected = [""] if names == [""] else [f"layers.{k}" for k in range(len(names))]
        if names != expected or any(layers[n].weight.dim() != 2 for n in names):
            raise ExportError(f"{path}: a {meta['model']} export needs linear layers {expected}, found {names}")
        _check_chain(path, [layers[n] for n in names], lambda l: l.in_features, lambda l: l.out_features)
        return FeedForward([layers[n] for n in names])
    if meta["model"] == "lenet5":
        if sorted(layers) != [f"layers.{k}" for k in range(5)] or [layers[f"layers.{k}"].weight.dim()
                                                                   for k in range(5)] != [4, 4, 2, 2, 2]:
            raise ExportError(f"{path}: a lenet5 export needs conv layers.0-1 and linear layers.2-4")
        ordered = [layers[f"layers.{k}"] for k in range(5)]
        fc_in = ordered[2].in_features // 16
        side = next((s for s in range(12, 1024) if ((s // 2 - 4) // 2) ** 2 == fc_in), None)
        if side is None or ordered[2].in_features % 16 or ordered[1].in_channels != ordered[0].out_channels \
                or ordered[1].out_channels != 16:
            raise ExportError(f"{path}: lenet5 layers do not fit together (fc input {ordered[2].in_features})")
        _check_chain(path, ordered[2:], lambda l: l.in_features, lambda l: l.out_features)
        return LeNet5(ordered, side)
    raise ValueError(f"load_model builds the models of `kronsparse train` (linear, mlp, lenet5), not "
                     f"{meta['model']!r}: use load_layers and place the layers in your own model")


def _check_chain(path, layers, size_in, size_out) -> None:
    for a, b in zip(layers[:-1], layers[1:]):
        if size_out(a) != size_in(b):
            raise ExportError(f"{path}: a layer of {size_out(a)} outputs feeds one of {size_in(b)} inputs")

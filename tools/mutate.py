"""A small mutation check: make each listed bug in a scratch copy and see whether its tests fail.

    python tools/mutate.py              # every mutation
    python tools/mutate.py -k stride    # those whose name contains "stride"
    python tools/mutate.py --tests-from f3a4858   # the same bugs against an older suite
    python tools/mutate.py --list

For every mutation, src/ and tests/ are copied into a fresh temporary folder (the working tree is
never touched), one exact snippet of one file is replaced, and only the tests named beside it run,
with PYTHONPATH pointing at the copy. "caught" means those tests failed; "MISSED" that they passed
with the bug in place; "stale" that the snippet is no longer in the source (the code moved on:
update the mutation). The unmutated copy is run first on the union of the tests, so a "caught" is
never a test that fails anyway. Exit status 0 when every mutation not marked `expect_missed` is caught.

Not part of the normal suite (it runs the selected tests once per mutation: a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutation:
    name: str
    guarantee: str
    file: str  # relative to the repository root
    old: str
    new: str
    tests: list[str]
    expect_missed: str = ""  # why it may be missed on this branch (reported, not counted as a failure)
    extra: list[tuple[str, str, str]] = field(default_factory=list)  # more (file, old, new) of the same bug


MUTATIONS = [
    # -- oracle gradients -------------------------------------------------------------------
    Mutation("grad-B-sign", "oracle gradients", "src/kronsparse/kernels.py",
             "return gx, (gC * A).sum(0), gC * S, gB, gbias, None, None",
             "return gx, (gC * A).sum(0), gC * S, -gB, gbias, None, None",
             ["tests/test_functional.py"]),
    Mutation("grad-S-sign", "oracle gradients", "src/kronsparse/kernels.py",
             "return gx, (gC * A).sum(0), gC * S, gB, gbias, None, None",
             "return gx, -(gC * A).sum(0), gC * S, gB, gbias, None, None",
             ["tests/test_functional.py"]),
    Mutation("grad-reorder-sign", "oracle gradients (and the method learns: MLP)", "src/kronsparse/kernels.py",
             "        return gt.view(ctx.shape), None, None",
             "        return -gt.view(ctx.shape), None, None",
             ["tests/test_functional.py", "tests/test_overhead.py"]),
    Mutation("grad-word-reorder-sign", "oracle gradients (and the method learns: MLP)", "src/kronsparse/kernels.py",
             "        return _WordReorder.apply(g, ctx.grid, not ctx.to_blocks, ctx.word).view(ctx.shape), None, None, None",
             "        return -_WordReorder.apply(g, ctx.grid, not ctx.to_blocks, ctx.word).view(ctx.shape), None, None, None",
             ["tests/test_overhead.py", "tests/test_train.py::test_the_method_learns_on_the_mlp"]),
    Mutation("kron-weight-ignores-S", "kron_weight (export, metrics) is the dense twin", "src/kronsparse/functional.py",
             "    return _build_weight(S * A, B)\n", "    return _build_weight(A, B)\n",
             ["tests/test_properties.py::test_layer_equals_dense_twin_for_random_shapes"]),
    Mutation("expand-block-mask-tiles", "block masks expand block by block", "src/kronsparse/blocks.py",
             "return mask.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)",
             "return mask.repeat(bo, bi)",
             ["tests/test_properties.py::test_group_shrink_properties"]),
    # -- masks hold while and after sparsifying ---------------------------------------------
    Mutation("prox-ignores-mask-while-sparsifying", "a zero block stays zero while sparsifying",
             "src/kronsparse/methods/kron.py",
             "            torch._foreach_mul_([S for S, _ in pruned], [m for _, m in pruned])\n",
             "            pass\n",
             ["tests/test_sparsifier.py::test_a_pruned_kron_block_never_revives_while_sparsifying"]),
    Mutation("mask-not-applied-after-sparsifying", "a zero block stays zero after sparsifying",
             "src/kronsparse/methods/kron.py",
             "        if self.finalized or step >= self.sparsify_steps or (self.lam == 0 and self.steering is None):\n"
             "            self._apply_masks()\n",
             "        if self.finalized or step >= self.sparsify_steps or (self.lam == 0 and self.steering is None):\n"
             "            pass\n",
             ["tests/test_kron_method.py",
              "tests/test_sparsifier.py::test_finalize_reaches_the_target_and_zero_blocks_stay_zero"]),
    # -- atomic writes ----------------------------------------------------------------------
    Mutation("atomic-write-in-place", "atomic writes", "src/kronsparse/atomic.py",
             "        write(tmp)\n        with open(tmp, \"rb+\") as f:\n            os.fsync(f.fileno())\n"
             "        os.replace(tmp, path)\n",
             "        write(str(path))  # straight into the real name: works, but a kill leaves a partial file\n"
             "        Path(tmp).unlink()\n",
             ["tests/test_resume.py::test_sigkill_during_a_write_never_leaves_a_truncated_file"]),
    # -- resume determinism -----------------------------------------------------------------
    Mutation("resume-redraws-the-epoch-order", "resume determinism", "src/kronsparse/training/train.py",
             'self.step, self.order, self.epoch_loss = state["step"], state["order"], state["epoch_loss"]',
             'self.step, self.order, self.epoch_loss = state["step"], None, state["epoch_loss"]',
             ["tests/test_resume.py::test_resume_in_process_after_an_exception_mid_epoch"]),
    Mutation("resume-drops-the-optimizer-state", "resume determinism", "src/kronsparse/training/train.py",
             '        self.optimizer.load_state_dict(state["optimizer"])\n',
             "",
             ["tests/test_resume.py::test_resume_in_process_after_an_exception_mid_epoch"]),
    # -- export round trips through every representation ------------------------------------
    Mutation("export-dense-columns-reversed", "export round trip: dense", "src/kronsparse/export.py",
             'out[entry.key("weight")] = entry.weight.t() if entry.transposed else entry.weight\n',
             'out[entry.key("weight")] = entry.weight.t() if entry.transposed else entry.weight.flip(-1)\n',
             ["tests/test_export.py", "tests/test_inference.py"]),
    Mutation("export-bsr-blocks-transposed", "export round trip: bsr", "src/kronsparse/export.py",
             '"values": bsr.values()}',
             '"values": bsr.values().transpose(-1, -2).reshape(bsr.values().shape)}',
             ["tests/test_export.py", "tests/test_inference.py"]),
    Mutation("export-factors-mask-for-S", "export round trip: factors", "src/kronsparse/export.py",
             "out.update({entry.key(k): v for k, v in entry.factors.items()})",
             'out.update({entry.key(k): (v.ne(0).to(v.dtype) if k == "S" else v) for k, v in entry.factors.items()})',
             ["tests/test_export.py", "tests/test_inference.py"]),
    # -- inference layers -------------------------------------------------------------------
    Mutation("bsr-drops-the-bias", "BSR inference keeps the bias", "src/kronsparse/inference.py",
             "        if self.bias is not None:\n            y = y + self.bias\n",
             "",
             ["tests/test_inference.py"]),
    Mutation("conv-dense-ignores-its-stride", "BlockSparseConv2d applies its stride (dense path)",
             "src/kronsparse/inference.py",
             'runs = {"dense": lambda x: nnf.conv2d(x, self.weight, self.bias, self.stride, self.padding)}',
             'runs = {"dense": lambda x: nnf.conv2d(x, self.weight, self.bias, 1, self.padding)}',
             ["tests/test_inference.py"]),
    Mutation("conv-bsr-ignores-its-stride", "BlockSparseConv2d applies its stride (BSR path)",
             "src/kronsparse/inference.py",
             "stride=(sh, sw))  # (N, in*kh*kw, L)", "stride=1)  # (N, in*kh*kw, L)",
             ["tests/test_inference.py"],
             extra=[("src/kronsparse/inference.py", "Ho, Wo = (H + 2 * ph - kh) // sh + 1, (Wd + 2 * pw - kw) // sw + 1",
                     "Ho, Wo = H + 2 * ph - kh + 1, Wd + 2 * pw - kw + 1")]),
    Mutation("replace-layers-skips-norms", "replace_layers_ loads every other tensor", "src/kronsparse/inference.py",
             "missing, unexpected = model.load_state_dict(rest, strict=False)",
             "missing, unexpected = model.load_state_dict({k: v for k, v in rest.items() if k in owned}, strict=False)",
             ["tests/test_inference.py", "tests/test_export.py"]),
    # -- data ---------------------------------------------------------------------------------
    Mutation("wrong-fashion-mnist-checksum", "the checksum registry holds the real files' sums",
             "src/kronsparse/training/data.py",
             '"0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"',
             '"0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c35"',
             ["tests/test_data.py::test_registry_checksums_are_those_of_the_real_files"]),
    # -- the method learns --------------------------------------------------------------------
    Mutation("norm-pin-divides-S", "the method learns (MLP, scale pin norm)", "src/kronsparse/methods/kron.py",
             "        torch._foreach_mul_(Ss, norms)\n",
             "        torch._foreach_div_(Ss, norms)\n",
             ["tests/test_train.py::test_the_method_learns_on_the_mlp"]),
    Mutation("materialize-detaches-W", "the method learns (linear: only the bias trains)", "src/kronsparse/kernels.py",
             "return torch.nn.functional.linear(x, _build_weight(S * A, B), bias)",
             "return torch.nn.functional.linear(x, _build_weight(S * A, B).detach(), bias)",
             ["tests/test_train.py::test_one_epoch_writes_files_that_agree_with_the_json",
              "tests/test_train.py::test_the_method_learns_on_the_linear_model"]),
    # -- layering and one home per rule ---------------------------------------------------------
    Mutation("library-imports-the-app", "the library never imports the application", "src/kronsparse/export.py",
             "def check_format(fmt: str) -> str:\n",
             "def check_format(fmt: str) -> str:\n    from .training import run_folder  # noqa: F401\n",
             ["tests/test_imports.py::test_the_library_never_imports_the_application"]),
    Mutation("app-miscounts-vit-layers", "the reports' scale pin is the method's", "src/kronsparse/training/models.py",
             "return 4 * VIT_MODELS[name].depth + 2", "return 4 * VIT_MODELS[name].depth + 1",
             ["tests/test_kron_method.py::test_the_app_pins_the_scale_of_each_of_its_models_as_the_method_does"]),
    Mutation("factor-lr-ignored", "Kronecker factors at 8x the lr under Adam-type optimizers", "src/kronsparse/methods/kron.py",
             "        return ADAPTIVE_FACTOR_LR if adaptive else 1.0\n", "        return 1.0\n",
             ["tests/test_sparsifier.py::test_factors_train_at_their_own_lr_multiple_under_adam_type_optimizers"]),
    Mutation("coverage-counts-candidates", "a select layer's W counted once in the coverage", "src/kronsparse/coverage.py",
             "            if not all(i in seen for i in params):\n",
             "            if True:\n",
             ["tests/test_real_models.py::test_coverage_counts_a_kronecker_layer_once_whatever_its_candidates"]),
    Mutation("cap-blend-flips-zero-sign", "the cap's scores are torch.where's to the bit", "src/kronsparse/methods/steering.py",
             "        out.sub_(m.sub_(1).mul_(filler))", "        out.add_(m.neg_().add_(1).mul_(filler))",
             ["tests/test_overhead.py::test_where_filled_is_torch_where_to_the_bit"]),
    Mutation("order-statistic-off-by-one", "the steering's k-th value is torch.kthvalue's", "src/kronsparse/methods/steering.py",
             "    return float(np.sort(values)[at])", "    return float(np.sort(values)[max(at - 1, 0)])",
             ["tests/test_overhead.py::test_kth_smallest_is_torch_kthvalue",
              "tests/test_overhead.py::test_select_picks_what_topk_picks"]),
]


def copy_tree(dest: Path, tests_from: str | None = None) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
    shutil.copytree(ROOT / "src", dest / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md"):  # tests read the pages (snippets, tables, links)
        shutil.copy2(ROOT / name, dest / name)
    for part in ("docs", "examples", "benchmarks", "results", ".ci"):
        shutil.copytree(ROOT / part, dest / part, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    if tests_from is None:
        shutil.copytree(ROOT / "tests", dest / "tests", ignore=ignore)
        return
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", tests_from, "tests"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def targets_in(dest: Path, tests: list[str]) -> list[str]:
    """The targets that exist in the copy's tests: a node id whose test is gone becomes its whole file."""
    out = []
    for t in tests:
        file, _, name = t.partition("::")
        if not (dest / file).is_file():
            continue
        out.append(t if not name or f"def {name}(" in (dest / file).read_text() else file)
    return sorted(set(out))


def apply(dest: Path, m: Mutation) -> str | None:
    """Apply the mutation in `dest`; the reason it cannot be applied, or None."""
    for file, old, new in [(m.file, m.old, m.new), *m.extra]:
        path = dest / file
        text = path.read_text()
        if text.count(old) != 1:
            return f"{file}: snippet found {text.count(old)} times, expected once"
        path.write_text(text.replace(old, new))
    return None


def env_for(dest: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(dest / "src"), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    shared = ROOT.parent / "shared" / "data"
    if "KRONSPARSE_DATA" not in env and shared.is_dir():  # the copy's conftest cannot find ../shared
        env["KRONSPARSE_DATA"] = str(shared)
    return env


def run_tests(dest: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-W", "ignore", *tests]
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env_for(dest), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    lines = [l for l in proc.stdout.splitlines() if l.strip()]
    return proc.returncode, lines[-1] if lines else proc.stderr.strip()[-200:]


def check_imports_the_copy(dest: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import kronsparse; print(kronsparse.__file__)"], cwd=dest,
                         env=env_for(dest), capture_output=True, text=True, check=True).stdout.strip()
    if not Path(out).resolve().is_relative_to(dest.resolve()):
        sys.exit(f"the scratch copy imports kronsparse from {out}, not from the copy: refusing to report")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default="", help="only mutations whose name contains this (comma-separated: any of them)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutation")
    ap.add_argument("--tests-from", metavar="REV", default=None,
                    help="run the tests of git revision REV instead (e.g. to see what an older suite missed)")
    ap.add_argument("--run", default=None, help="comma-separated test targets to run for every mutation instead of its own")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if any(k in m.name for k in args.k.split(","))]
    if args.run:
        chosen = [Mutation(m.name, m.guarantee, m.file, m.old, m.new, args.run.split(","), m.expect_missed, m.extra)
                  for m in chosen]
    if args.list:
        for m in chosen:
            print(f"{m.name:40s} {m.guarantee}: {' '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="kronsparse-mutate-") as tmp:
        base = Path(tmp) / "baseline"
        copy_tree(base, args.tests_from)
        check_imports_the_copy(base)
        tests = targets_in(base, [t for m in chosen for t in m.tests])
        start = time.monotonic()
        rc, last = run_tests(base, tests, args.timeout * 2)
        print(f"baseline (no mutation) on {len(tests)} test targets: rc {rc}, {last} ({time.monotonic() - start:.0f} s)")
        if rc != 0:
            print("the unmutated tests fail: fix them first")
            return 2
        failures = 0
        print(f"{'mutation':40s} {'result':8s} guarantee / tests")
        for m in chosen:
            dest = Path(tmp) / m.name
            copy_tree(dest, args.tests_from)
            why = apply(dest, m)
            start = time.monotonic()
            targets = targets_in(dest, m.tests)
            if why:
                result, detail = "stale", why
            elif not targets:
                result, detail = "no tests", "none of its test files exist in these tests"
            else:
                rc, detail = run_tests(dest, targets, args.timeout)
                result = "caught" if rc == 1 else "MISSED" if rc == 0 else f"error {rc}"
            note = f" (expected: {m.expect_missed})" if result != "caught" and m.expect_missed else ""
            failures += result != "caught" and not m.expect_missed
            print(f"{m.name:40s} {result:8s} {m.guarantee}; {' '.join(targets)}: {detail} "
                  f"({time.monotonic() - start:.0f} s){note}", flush=True)
            shutil.rmtree(dest, ignore_errors=True)
        print(f"{len(chosen) - failures} of {len(chosen)} as expected")
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

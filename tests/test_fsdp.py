"""The Sparsifier under FSDP2 (`fully_shard`) on two gloo processes trains as one process does.

tests/fsdp_run.py trains a 3-layer MLP (float64, blocks 4x4, target 0.5) sharded over two ranks, the
second and third layers' block rows split between them, and saves and resumes it mid-sparsifying
with torch.distributed.checkpoint. The oracle is the same training in this process on the whole
global batch: the same losses, the same zero blocks, the target reached over the whole layers (a
per-rank count gives about half of it), no block zero on one rank only, and the resumed run ends
where the uninterrupted one does.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from kronsparse.blocks import block_view
from kronsparse.methods.steering import count_for

if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import fsdp_run as run  # noqa: E402  (tests/ is on the path, as for architectures.py)

METHODS = ["kron", "block-magnitude", "group-lasso", "elastic-group-lasso", "rigl"]
try:
    import transformers  # noqa: F401
    GPT = ["gpt2-group-lasso"]  # a dense-weight method on Conv1D weights, stored (in, out)
except ImportError:
    GPT = []


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, dict]:
    """Every method's results on two ranks, in one pair of processes (~20 s)."""
    out = tmp_path_factory.mktemp("fsdp")
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("fsdp_run.py")), str(out), *METHODS, *GPT],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {m: torch.load(out / f"{m}.pt", weights_only=False) for m in [*METHODS, *GPT, "refusals"]}


@pytest.fixture(scope="module")
def single() -> dict[str, dict]:
    """The same training in one process, on the whole global batch."""
    results = {}
    for method in METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 4-row head warns nothing; keep the output quiet anyway
            net, sp, opt = run.build(method)
        results[method] = {"losses": run.train(net, sp, opt, range(run.STEPS)), "weights": run.final_weights(sp),
                           "summary": str(sp.summary()), "topup_share": sp.topup_share()}
    return results


def zeros_per_block(W: torch.Tensor, block=run.BLOCK) -> torch.Tensor:
    return block_view(W, block).eq(0).flatten(2).sum(-1)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_sharded_training_matches_one_process(method, sharded, single):
    got, want = sharded[method], single[method]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-9, atol=0)
    for name, W in want["weights"].items():  # the same zeros in every block: a block zero on one rank only shows
        assert torch.equal(zeros_per_block(got["weights"][name]), zeros_per_block(W)), f"{method}: layer {name}'s zeros"
        torch.testing.assert_close(got["weights"][name], W, rtol=1e-9, atol=1e-12)
    assert got["summary"] == want["summary"]
    assert got["topup_share"] == want["topup_share"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_sharded_blocks_are_whole_and_the_target_is_global(method, sharded):
    got = sharded[method]
    for name, W in got["weights"].items():
        zeros = zeros_per_block(W)
        if method != "rigl":  # RigL grows blocks at exactly zero, and entries fed by a dead ReLU stay so (one process too)
            assert set(zeros.unique().tolist()) <= {0, 16}, f"{method}: a block of layer {name} is partly zero"
        zero = int((zeros == 16).sum())
        assert zero == count_for(run.TARGET, zeros.numel()), f"{method}: layer {name}"
        assert got["layer_sparsity"][name] == zero / zeros.numel()  # the Sparsifier's own count, on the sharded model


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_dcp_checkpoint_resumes_to_the_same_end(method, sharded):
    got = sharded[method]
    assert got["resumed_losses"] == got["losses"][run.RESUME_AT:]
    for name, W in got["weights"].items():
        assert torch.equal(got["resumed_weights"][name], W), f"{method}: layer {name}"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_masked_gradients_stay_zero_on_the_sharded_parameters(method, sharded):
    held, moved = sharded[method]["masked_grads"]
    assert moved == 0
    assert held > 0 or method == "block-magnitude"  # its mask multiplies the weight in the forward instead


@pytest.mark.slow
@pytest.mark.parametrize("what, says", [("sparsifier after fully_shard", "build the Sparsifier first"),
                                        ("select", "does not run on a sharded"),
                                        ("iterative-pruning", "does not run on a sharded"),
                                        ("optimizer before fully_shard", "and after fully_shard"),
                                        ("squash", "unsharded model")])
def test_what_a_sharded_model_cannot_do_is_refused_in_one_line(what, says, sharded):
    assert says in sharded["refusals"][what]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_sharded_run_squashes_through_an_unsharded_model(method, sharded):
    got = sharded[method]
    for name, W in got["weights"].items():
        assert torch.equal(got["squashed"][name], W), f"{method}: layer {name}"


@pytest.mark.slow
@pytest.mark.skipif(not GPT, reason="transformers is not installed (the hf extra)")
@pytest.mark.parametrize("method", GPT or ["gpt2-group-lasso"])
def test_a_sharded_gpt2_trains_as_one_process(method, sharded):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notices about a tiny config
        want = run.train_gpt(*run.gpt2(method[5:]))
    got = sharded[method]  # transformers computes the loss in float32: to 1e-6
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want["losses"]), rtol=1e-6, atol=0)
    assert got["layer_sparsity"] == want["layer_sparsity"] == dict.fromkeys(want["layer_sparsity"], run.TARGET)
    for name, W in want["weights"].items():
        assert torch.equal(zeros_per_block(got["weights"][name], (4, 8)), zeros_per_block(W, (4, 8))), name  # (out, in)
        torch.testing.assert_close(got["weights"][name], W, rtol=1e-6, atol=1e-9)

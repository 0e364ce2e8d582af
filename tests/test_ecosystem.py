"""KronLinear with the rest of PyTorch: torch.compile, DDP on gloo, CPU bf16 autocast, transformers."""

import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kronsparse import KronLinear

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("input_first", "factors_first", "materialize")


def grads_of(layer, x):
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), [p.grad.clone() for p in (layer.S, layer.A, layer.B, layer.bias)] + [x.grad.clone()]


@pytest.mark.slow  # inductor compiles C++: ~40 s of the suite's ~150 s
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_equals_eager_forward_and_backward(path, backend):
    """aot_eager traces the custom autograd Function through AOTAutograd; inductor also generates and
    compiles C++ for it (about 10 s per path on 2 cores)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = KronLinear(32, 16, (4, 8), rank=2, path=path)
    compiled_layer = KronLinear(32, 16, (4, 8), rank=2, path=path)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer, backend=backend, fullgraph=True)
    x = torch.randn(6, 32)
    y0, g0 = grads_of(eager, x.clone().requires_grad_())
    y1, g1 = grads_of(compiled, x.clone().requires_grad_())
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)


DDP_SCRIPT = textwrap.dedent('''
    import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
    from torch.nn.parallel import DistributedDataParallel as DDP
    from kronsparse import KronLinear

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(KronLinear(16, 8, (2, 4), 2), torch.nn.ReLU(), KronLinear(8, 4, (2, 2), 2))

    def data():
        g = torch.Generator().manual_seed(1)
        return torch.randn(3, 8, 16, generator=g), torch.randn(3, 8, 4, generator=g)  # 3 steps, global batch 8

    def train(net, rank, world):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        xs, ys = data()
        for x, y in zip(xs, ys):
            part = slice(rank * 8 // world, (rank + 1) * 8 // world)
            loss = (net(x[part]) - y[part]).pow(2).mean()
            opt.zero_grad(); loss.backward(); opt.step()

    def worker(rank, world, out):
        torch.set_num_threads(1)  # a file rendezvous: no port to pick that another process could take first
        dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=world)
        net = DDP(model())
        train(net, rank, world)
        if rank == 0:
            torch.save({k: v.detach() for k, v in net.module.state_dict().items()}, out)
        dist.barrier()  # without it one rank could tear gloo down under the other: SIGABRT in 3 of 12 runs, 0 of 16 with it
        dist.destroy_process_group()
        sys.stdout.flush()
        os._exit(0)  # no interpreter teardown, where gloo objects still alive can abort (as in tests/fsdp_run.py)

    if __name__ == "__main__":
        mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2)
        single = model()
        train(single, 0, 1)
        ddp = torch.load(sys.argv[1], weights_only=True)
        for k, v in single.state_dict().items():
            torch.testing.assert_close(ddp[k], v, rtol=1e-5, atol=1e-6)
        print("DDP == single process")
''')


@pytest.mark.slow  # two processes, ~20 s
def test_ddp_on_two_gloo_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ddp.pt"), str(tmp_path / "rendezvous")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DDP == single process" in done.stdout


@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast_forward_matches_fp32(path):
    torch.manual_seed(0)
    layer = KronLinear(64, 32, (4, 8), rank=2, path=path)
    x = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_autocast_backward_matches_fp32(path):
    torch.manual_seed(0)
    layer = KronLinear(64, 32, (4, 8), rank=2, path=path)
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    grads = torch.autograd.grad(y.float().sum(), [x, *layer.parameters()])
    ref = torch.autograd.grad(layer(x).sum(), [x, *layer.parameters()])
    for g, r in zip(grads, ref):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2)


@pytest.mark.slow  # a BERT, ~3 s
def test_a_transformers_bert_converts_trains_and_exports(tmp_path):
    pytest.importorskip("transformers", reason="the hf extra is not installed: pip install -e '.[hf]'")
    example = runpy.run_path(str(ROOT / "examples" / "convert_hf_model.py"))
    result = example["main"](["--out", str(tmp_path), "--steps", "20"])
    report = result["report"]
    assert len(report.swapped) == 12 and set(report.skipped) == {"cls.predictions.transform.dense",
                                                                 "cls.predictions.decoder"}
    assert result["block_sparsity"] > 0 and result["max_diff"] < 1e-4
    assert all(p.is_file() for p in result["files"].values())

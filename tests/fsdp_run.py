"""Train a small MLP with a method's Sparsifier under FSDP2 on two gloo processes (tests/test_fsdp.py).

    python tests/fsdp_run.py OUT_DIR METHOD [METHOD ...]   (gpt2-METHOD: a GPT-2 block, no resume)

Spawns two ranks. For each method each rank builds the model, the Sparsifier, `fully_shard` on every
Linear and on the model, and the optimizer, and trains STEPS steps on its half of every global batch,
finalizing at FINALIZE_AT; at step RESUME_AT the run is saved with torch.distributed.checkpoint, and
a fresh model, Sparsifier and optimizer resume from it to the end. Rank 0 writes OUT_DIR/METHOD.pt:
the losses and final dense weights of both runs, the Sparsifier's counts, a backward's masked
gradients and the plain model squashed from the run; OUT_DIR/refusals.pt holds what a sharded
model refuses. `build`, `train`, `gpt2` and `train_gpt` serve the one-process reference too.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kronsparse import Sparsifier
from kronsparse.methods.schedules import Every
from kronsparse.model_tree import layer_weight
from kronsparse.sharding import gathered

# kron and group lasso finalize themselves at step 27 (the end of their sparsifying phase); every
# method is finalized at step FINALIZE_AT, and trains on with its masks frozen (no gathering then)
STEPS, RESUME_AT, FINALIZE_AT, BATCH = 40, 22, 35, 16
BLOCK, TARGET = (4, 4), 0.5
# kron's factored path (layers this small would take "materialize", a plain F.linear)
OPTIONS = {"kron": {"rank": 2, "path": "input_first"}, "rigl": {}, "block-magnitude": {}, "group-lasso": {},
           "elastic-group-lasso": {}}


def model() -> nn.Module:
    """Row-sharded over two ranks, the first layer's 24 rows split at a block row (12 = 3 blocks of 4),
    the second's 12 and the third's 4 inside one (rows 6 and 2): blocks spanning both ranks. The
    in-place ReLUs act on the layers' outputs, which FSDP2 hooks for the backward."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(inplace=True), nn.Linear(24, 12), nn.ReLU(inplace=True),
                         nn.Linear(12, 4)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 16, generator=g, dtype=torch.float64)
    return x, torch.tanh(x @ torch.randn(16, 4, generator=g, dtype=torch.float64))


def build(method: str, shard: bool = False):
    net = model()
    sp = Sparsifier(net, method, block_shape=BLOCK, target_sparsity=TARGET, total_steps=STEPS, **OPTIONS[method])
    if method == "rigl":  # its masks move every 100 steps: here every 8 (steps 8, 16 and, after the resume, 24)
        sp.method.is_update = Every(8, int(sp.method.end_fraction * STEPS))
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        fully_shard(net)
    return net, sp, sp.optimizer(torch.optim.AdamW, lr=1e-2, weight_decay=0.01)


def step(sp, opt, loss, world: int) -> float:
    """One training step on this rank's loss; returns the global batch's loss (the mean over ranks)."""
    opt.zero_grad()
    loss.backward()
    opt.step()
    sp.step(opt)
    loss = loss.detach()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    return float(loss)


def train(net, sp, opt, steps: range, rank: int = 0, world: int = 1, on_step=None) -> list[float]:
    """The global batch split over the ranks; the loss returned is the global batch's."""
    xs, ys = data()
    part = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    losses = []
    for t in steps:
        losses.append(step(sp, opt, (net(xs[t, part]) - ys[t, part]).pow(2).mean(), world))
        if on_step is not None:
            on_step(t)
        if t == FINALIZE_AT:
            sp.finalize(opt)
    return losses


def masked_grads(net, sp) -> tuple[int, int]:
    """One more backward after finalize: (gradient entries the masks must hold at zero, how many are
    not zero); under FSDP2 the masks act on the reduced gradient chunks (sharding.sharded_grad_hook)."""
    xs, ys = data()
    net.zero_grad()
    (net(xs[0]) - ys[0]).pow(2).mean().backward()
    held = moved = 0
    for k, layer in enumerate(sp.sparsified_layers().values()):
        for p in layer.parameters():
            mask = getattr(getattr(p, "_kronsparse_grad_fn", None), "mask", None)
            if sp.method.name == "rigl" and p.dim() > 1:  # its hook masks the entries of its pruned blocks
                mask = ~sp.method.pruned[k]
            if mask is not None and p.grad is not None:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                held += int((~mask.bool()).sum())
                moved += int((grad[~mask.bool()] != 0).sum())
    return held, moved


@torch.no_grad()
def final_weights(sp) -> dict[str, torch.Tensor]:
    """Every sparsified layer's dense weight, whole (gathered on every rank)."""
    layers = sp.sparsified_layers()
    with gathered(layers.values(), write_back=False):
        return {name: layer_weight(layer).detach().clone() for name, layer in layers.items()}


def run(method: str, out: Path, rank: int, world: int) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt = str(out / f"{method}-ckpt")

    def save(t: int) -> None:
        if t == RESUME_AT - 1:
            model_state, optim_state = get_state_dict(net, opt)
            state = io.BytesIO()
            torch.save(sp.state_dict(), state)
            dcp.save({"model": model_state, "optim": optim_state, "sparsifier": state}, checkpoint_id=ckpt)

    net, sp, opt = build(method, shard=True)
    losses = train(net, sp, opt, range(STEPS), rank, world, on_step=save)
    result = {"losses": losses, "weights": final_weights(sp), "block_sparsity": sp.block_sparsity(),
              "layer_sparsity": sp.layer_sparsity(), "summary": str(sp.summary()), "topup_share": sp.topup_share(),
              "masked_grads": masked_grads(net, sp)}
    net, sp, opt = build(method, shard=True)
    model_state, optim_state = get_state_dict(net, opt)
    state = {"model": model_state, "optim": optim_state, "sparsifier": io.BytesIO()}
    dcp.load(state, checkpoint_id=ckpt)
    state["sparsifier"].seek(0)
    sp.load_state_dict(torch.load(state["sparsifier"], weights_only=False), opt)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    result["resumed_losses"] = train(net, sp, opt, range(RESUME_AT, STEPS), rank, world)
    result["resumed_weights"] = final_weights(sp)
    result["squashed"] = squashed(method, net, sp)
    return result


def squashed(method: str, net, sp) -> dict[str, torch.Tensor]:
    """The plain model out of a sharded run: its full state dict and the Sparsifier's state loaded
    into an unsharded model with its own Sparsifier, which squashes it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True))
    plain, plain_sp, _ = build(method)
    plain_sp.load_state_dict(sp.state_dict())
    plain.load_state_dict(full)
    plain_sp.squash()
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in plain.modules()), plain  # plain modules only
    return {name: plain.get_submodule(name).weight.detach().clone() for name in sp.layers}


GPT_STEPS = 12


def gpt2(method: str = "group-lasso", shard: bool = False):
    """A one-block GPT-2: its Conv1D weights are stored (in, out), tiled as stored in (bi, bo) blocks,
    and sharded over their 24 input rows (block rows of 8 split between the ranks); the head tied to
    the embedding stays dense."""
    import transformers

    torch.manual_seed(0)
    net = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=24, n_layer=1,
                                                               n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                                               attn_pdrop=0.0)).double()  # no dropout: no RNG
    sp = Sparsifier(net, method, block_shape=(4, 8), target_sparsity=TARGET, total_steps=GPT_STEPS)
    if shard:
        from torch.distributed.fsdp import fully_shard

        fully_shard(net.transformer.h[0])
        fully_shard(net)
    return net, sp, sp.optimizer(torch.optim.AdamW, lr=1e-2)


def train_gpt(net, sp, opt, rank: int = 0, world: int = 1) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (GPT_STEPS, 4, 16), generator=g)
    losses = []
    for batch in ids:
        mine = batch[rank * 4 // world:(rank + 1) * 4 // world]
        losses.append(step(sp, opt, net(input_ids=mine, labels=mine).loss, world))
    sp.finalize(opt)
    return {"losses": losses, "weights": final_weights(sp), "layer_sparsity": sp.layer_sparsity()}


def refusals() -> dict[str, str]:
    """What a sharded model cannot do, each a one-line ValueError."""
    from torch.distributed.fsdp import fully_shard

    said = {}

    def attempt(what, fn):
        try:
            fn()
        except ValueError as error:
            said[what] = str(error)

    net = fully_shard(model())
    attempt("sparsifier after fully_shard", lambda: Sparsifier(net, "group-lasso", block_shape=BLOCK, target_sparsity=TARGET,
                                                                   total_steps=STEPS))
    for method in ("select", "iterative-pruning"):
        net = model()
        sp = Sparsifier(net, method, block_shape=BLOCK, target_sparsity=TARGET, total_steps=STEPS,
                        **({"candidates": [BLOCK, (2, 2)]} if method == "select" else {}))
        fully_shard(net)
        attempt(method, lambda: sp.step(torch.optim.SGD(net.parameters(), lr=0.1)))
    net = model()
    sp = Sparsifier(net, "kron", block_shape=BLOCK, target_sparsity=TARGET, total_steps=STEPS)
    early = sp.optimizer(torch.optim.AdamW, lr=1e-2)
    fully_shard(net)
    attempt("optimizer before fully_shard", lambda: sp.step(early))
    net, sp, opt = build("kron", shard=True)
    attempt("squash", sp.squash)
    return said


def worker(rank: int, world: int, out: Path, methods: list[str]) -> None:
    torch.set_num_threads(1)  # a file rendezvous: no port to pick that another process could take first
    dist.init_process_group("gloo", init_method="file://" + str(out / "rendezvous"), rank=rank, world_size=world)
    try:
        said = refusals()
        if rank == 0:
            torch.save(said, out / "refusals.pt")
        for method in methods:
            if method.startswith("gpt2-"):  # e.g. gpt2-group-lasso
                result = train_gpt(*gpt2(method[5:], shard=True), rank, world)
            else:
                result = run(method, out, rank, world)
            if rank == 0:
                torch.save(result, out / f"{method}.pt")
    finally:
        dist.barrier()  # without it one rank may tear gloo down under the other (SIGABRT)
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: FSDP's state still holds gloo work objects, whose C++
    # destructors at exit aborted a finished run now and then ("terminate called without an active
    # exception", SIGABRT after every result was saved). Reached only when every method succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(2, Path(sys.argv[1]).resolve(), sys.argv[2:]), nprocs=2)

"""The Sparsifier on a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`).

fully_shard turns each parameter into a DTensor holding one chunk of its rows on every rank. A
method's per-step work (proximal maps, the scale pin, masks, thresholds from order statistics, the
top-up) needs the whole tensor: a block row may span two ranks' chunks, and a count of zero blocks
or a k-th smallest score means something only over the whole layer. So the Sparsifier runs that
work on full parameters: `gathered(layers)` swaps every sharded parameter of the layers for a full
copy (all-gathered, identical on every rank), the method's code runs unchanged on the copies, and
each rank writes its own chunk back. Every rank computes the same thing from the same tensors, so a
block is zero on all ranks or on none and every count is global. The cost is one all-gather of the
sparsified layers' parameters per step: S, A, B for kron (small), the weights for the dense-weight
methods (what FSDP gathers for the forward anyway).

A copy knows the sharded parameter it stands for (`sharded_of`), so code that looks a parameter up
in the optimizer (its lr, its state) or hooks its gradient reaches the real one, and it carries the
marks kronsparse set on that one (`_kronsparse*` attributes: a Conv1D weight's orientation). Without
torch.distributed, or with no process group, everything here is a no-op.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor, distribute_tensor = (), None

STANDS_FOR = "_kronsparse_stands_for"  # on a full copy: the sharded parameter it stands for


def distributed() -> bool:
    """True when a process group is up (the only case where a parameter can be sharded)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def is_sharded(tensor) -> bool:
    return isinstance(tensor, DTensor)


def sharded_of(param: Tensor) -> Tensor:
    """The parameter the optimizer and the model hold: the sharded one for a full copy, else itself."""
    return getattr(param, STANDS_FOR, param)


def local_part(param: Tensor, full: Tensor) -> Tensor:
    """The chunk of `full` (shaped like sharded `param`) that this rank holds, by param's placements."""
    return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()


def fsdp_wrapped(cls: type) -> type | None:
    """The class that fully_shard wrapped, for the class it makes on the fly (FSDP<cls>, bases
    (FSDPModule, cls)); None for any other class."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: nothing was wrapped
    if fsdp is not None and len(cls.__bases__) == 2 and cls.__bases__[0] is fsdp.FSDPModule:
        return cls.__bases__[1]
    return None


def any_sharded(modules: Iterable[nn.Module]) -> bool:
    return distributed() and any(is_sharded(p) for m in modules for p in m.parameters())


@contextmanager
def gathered(modules: Iterable[nn.Module], write_back: bool = True) -> Iterator[None]:
    """Inside, every sharded parameter of `modules` (and their submodules) is a full plain copy;
    on exit (write_back) every rank copies its chunk of each copy into the sharded parameter, and
    the sharded parameters are put back. A parameter shared by two modules gets one copy."""
    if not distributed():
        yield
        return
    copies: dict[int, nn.Parameter] = {}
    swapped = []
    for module in modules:
        for owner in module.modules():
            for name, p in list(owner._parameters.items()):
                if is_sharded(p):
                    if id(p) not in copies:
                        copies[id(p)] = copy = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                        vars(copy).update({k: v for k, v in vars(p).items() if k.startswith("_kronsparse")})
                        setattr(copy, STANDS_FOR, p)
                    owner._parameters[name] = copies[id(p)]  # as FSDP itself swaps in unsharded parameters
                    swapped.append((owner, name, p))
    try:
        yield
    finally:
        done = set()
        for owner, name, p in swapped:
            if write_back and id(p) not in done:
                with torch.no_grad():
                    p.to_local().copy_(local_part(p, owner._parameters[name].detach()))
                done.add(id(p))
            owner._parameters[name] = p


@torch.no_grad()
def sharded_grad_hook(param: Tensor) -> None:
    """FSDP2 calls a sharded parameter's post-accumulate-grad hooks once its gradient chunk is
    reduced: pass the gradient through the parameter's `_kronsparse_grad_fn` (methods.base). A mask
    is applied to the local chunk; any other function sees the full gradient (one all-gather)."""
    fn = getattr(param, "_kronsparse_grad_fn", None)
    if fn is None or param.grad is None:
        return
    grad = param.grad.to_local()
    mask = getattr(fn, "mask", None)
    if mask is not None:
        grad.mul_(fn.local(param))
    else:
        grad.copy_(local_part(param, fn(param.grad.full_tensor())))

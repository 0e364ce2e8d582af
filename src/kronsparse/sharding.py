"""The Sparsifier on a model sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`).

fully_shard turns each parameter into a DTensor holding one chunk of its rows on every rank. A
method's per-step work (proximal maps, the scale pin, masks, thresholds from order statistics, the
top-up) needs the whole tensor: a block row may span two ranks' chunks, and a count of zero blocks
or a k-th smallest score means something only over the whole layer. So the Sparsifier runs that
work on full parameters: `gathered(layers)` swaps every sharded parameter of the layers for a full
copy (all-gathered, identical on every rank), the method's code runs unchanged on the copies, and
each rank writes its own chunk back. Every rank computes the same thing from the same tensors, so a
block is zero on all ranks or on none and every count is global. The cost is one all-gather of the
sparsified layers' parameters per step (`full_tensors`), all layers at once: S, A, B for kron
(small), but the whole weights of the sparsified layers for the dense-weight methods, held on every
rank while the method works (computing their block norms from the local rows, summed over the
ranks, would avoid that; not done). Once a method is finalized its steps only apply frozen masks,
which every rank does on its own chunk (`zero_where_`), gathering nothing.

A copy knows the sharded parameter it stands for (`sharded_of`), so code that looks a parameter up
in the optimizer (its lr, its state) or hooks its gradient reaches the real one, and it carries the
marks kronsparse set on that one (`_kronsparse*` attributes: a Conv1D weight's orientation). Without
torch.distributed, or with no process group, everything here is a no-op.
"""

from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
except ImportError:  # a torch built without distributed: nothing is ever sharded
    DTensor, Shard, distribute_tensor = (), None, None

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
    swapped = [(owner, name, p) for module in modules for owner in module.modules()
               for name, p in owner._parameters.items() if is_sharded(p)]
    params = list({id(p): p for _, _, p in swapped}.values())
    copies: dict[int, nn.Parameter] = {}
    for p, full in zip(params, full_tensors(params)):
        copies[id(p)] = copy = nn.Parameter(full, requires_grad=p.requires_grad)
        vars(copy).update({k: v for k, v in vars(p).items() if k.startswith("_kronsparse")})
        setattr(copy, STANDS_FOR, p)
    for owner, name, p in swapped:
        owner._parameters[name] = copies[id(p)]  # as FSDP itself swaps in unsharded parameters
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
def zero_where_(param: Tensor, where: Tensor) -> None:
    """param[where] = 0 in place, `where` shaped like the whole param; a sharded param zeroes its own
    chunk (no gathering: the frozen masks of a finalized method are applied so)."""
    if is_sharded(param):
        param.to_local().masked_fill_(local_part(param, where), 0)
    else:
        param.masked_fill_(where, 0)


@torch.no_grad()
def full_tensors(params: list[Tensor]) -> list[Tensor]:
    """The whole tensors of sharded `params`, the same on every rank. Those sharded by rows over a
    1-D mesh (FSDP2's default) come in one all-gather per mesh and dtype, as FSDP gathers them (one
    `full_tensor` each cost about 1 ms of latency apiece on CPU gloo); any other placement one by one."""
    fulls: list[Tensor | None] = [None] * len(params)
    batches: dict[tuple, list[int]] = {}
    for k, p in enumerate(params):
        if p.device_mesh.ndim == 1 and tuple(p.placements) == (Shard(0),):
            batches.setdefault((id(p.device_mesh), p.dtype, p.device), []).append(k)
        else:
            fulls[k] = p.full_tensor()
    for ks in batches.values():
        for k, full in zip(ks, _gather_rows([params[k] for k in ks])):
            fulls[k] = full
    return fulls


def _gather_rows(params: list[Tensor]) -> list[Tensor]:
    """Row-sharded params of one mesh and dtype, whole. Rank r holds rows [r*c, (r+1)*c) of a
    tensor of n rows, c = ceil(n / world) (torch.chunk's split, FSDP2's and DTensor's)."""
    mesh = params[0].device_mesh
    world = mesh.size()
    chunk = [-(-p.shape[0] // world) for p in params]
    width = [math.prod(p.shape[1:]) for p in params]  # entries per row
    local = []
    for p, c, w in zip(params, chunk, width):
        mine = p.to_local().reshape(-1)
        local += [mine, mine.new_zeros(c * w - mine.numel())]  # padded to c rows
    flat = torch.cat(local)
    pieces = [torch.empty_like(flat) for _ in range(world)]
    torch.distributed.all_gather(pieces, flat, group=mesh.get_group())
    fulls, offset = [], 0
    for p, c, w in zip(params, chunk, width):
        rows = [max(0, min(c, p.shape[0] - r * c)) for r in range(world)]
        fulls.append(torch.cat([pieces[r][offset:offset + n * w] for r, n in enumerate(rows)]).view(p.shape))
        offset += c * w
    return fulls


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

"""Peak memory of a piece of code on CPU or CUDA, counted exactly from the allocator's events.

`peak_bytes(fn)` runs fn once under torch.profiler (profile_memory=True) and returns the highest
sum of bytes allocated minus bytes freed at any moment during the call, relative to its start: what
fn needs on top of what already exists (parameters, inputs, optimizer state made beforehand). On
CUDA it reads torch.cuda.max_memory_allocated instead. Deterministic: counts bytes, times nothing.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn, device="cpu") -> int:
    """Peak bytes allocated by fn() above the memory in use when it starts."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def fb_peak_bytes(module, x, gy, device="cpu") -> int:
    """Peak bytes of one forward + backward of module(x) with upstream gradient gy, after a warm-up one
    (cached reorder indices and the allocator's first touches are not per-step memory); gradients are
    cleared around it."""
    def fb():
        module(x).backward(gy)

    fb()
    module.zero_grad(set_to_none=True)
    x.grad = None
    peak = peak_bytes(fb, device)
    module.zero_grad(set_to_none=True)
    x.grad = None
    return peak

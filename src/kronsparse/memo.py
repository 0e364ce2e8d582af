"""`memoised`: functools.lru_cache that torch.compile traces without a warning.

The cost model and the kernels' index tables are looked up on every forward, so they are cached.
Dynamo cannot honour an lru_cache (it traces the wrapped function and warns that it ignored the
cache), so under compilation the plain function is called: its results depend only on shapes,
which dynamo turns into constants of the graph anyway.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def memoised(maxsize: int) -> Callable:
    def wrap(fn: Callable) -> Callable:
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling():
                return fn(*args)
            return cached(*args)

        call.cache_clear = cached.cache_clear
        return call
    return wrap

"""Training methods: a plain-dict registry from name to class."""

from __future__ import annotations

from .base import Method
from .kron import KronMethod

METHODS: dict[str, type[Method]] = {
    "dense": Method,
    "kron": KronMethod,
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]

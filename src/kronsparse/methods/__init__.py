"""Training methods: a plain-dict registry from name to class."""

from __future__ import annotations

from .base import Method
from .block_magnitude import BlockMagnitudeMethod
from .elastic_group_lasso import ElasticGroupLassoMethod
from .group_lasso import GroupLassoMethod
from .kron import KronMethod
from .pruning import IterativePruningMethod
from .rigl import RigLMethod
from .select import SelectMethod

METHODS: dict[str, type[Method]] = {
    "dense": Method,
    "kron": KronMethod,
    "group-lasso": GroupLassoMethod,
    "elastic-group-lasso": ElasticGroupLassoMethod,
    "rigl": RigLMethod,
    "iterative-pruning": IterativePruningMethod,
    "block-magnitude": BlockMagnitudeMethod,
    "select": SelectMethod,
}


def get_method(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]

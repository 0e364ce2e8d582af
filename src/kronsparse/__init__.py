"""kronsparse: train block-sparse PyTorch models without ever training a dense weight."""

from .costs import LayerCosts, choose_path, layer_costs, plan_block_shapes
from .functional import kron_linear, kron_weight
from .layers import KronConv2d, KronLinear, SwapReport, swap_linear_
from .planner import Plan, plan
from .sparsifier import Sparsifier

__all__ = [
    "KronConv2d",
    "KronLinear",
    "LayerCosts",
    "Plan",
    "Sparsifier",
    "SwapReport",
    "choose_path",
    "kron_linear",
    "kron_weight",
    "layer_costs",
    "plan",
    "plan_block_shapes",
    "swap_linear_",
]
__version__ = "0.1.0"

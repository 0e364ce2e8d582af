"""Elastic Group LASSO: Group LASSO plus an element-wise l1 term .

Penalty per layer, as the authors weighted it (0.1 * GL + 0.05 * mean|W| is lambda = 0.1 here):

    lambda * (sum_g sqrt(bo*bi) * ||W_g||_F + l1_ratio * mean|W|),   l1_ratio = 0.5

Its exact proximal map is the element-wise soft-threshold (lr*lambda*l1_ratio/numel) followed by
the group shrink (lr*lambda*sqrt(bo*bi)). Note that with the mean the l1 threshold per entry is
tiny next to the group threshold (1/numel of it), so the result is close to Group LASSO. Steering,
revival and freezing are Group LASSO's (group_lasso.py).
"""

from __future__ import annotations

from torch import Tensor

from ..functional import group_lasso_penalty, soft_threshold
from .group_lasso import GroupLassoMethod


def elastic_group_lasso_penalty(W: Tensor, block_shape, l1_ratio: float) -> Tensor:
    """sum_g sqrt(bo*bi) * ||W_g||_F + l1_ratio * mean|W|."""
    return group_lasso_penalty(W, block_shape) + l1_ratio * W.abs().mean()


class ElasticGroupLassoMethod(GroupLassoMethod):
    name = "elastic-group-lasso"
    l1_ratio = 0.5  # the authors' 0.05 / 0.1

    def prox(self, W: Tensor, threshold: float, block_shape=None) -> Tensor:
        """Soft-threshold each entry (the l1 part), then shrink each block (the group part)."""
        return super().prox(soft_threshold(W, threshold * self.l1_ratio / W.numel()), threshold, block_shape)

    def penalty_value(self) -> float:
        return sum(lam * elastic_group_lasso_penalty(*self.grid(l.weight), self.l1_ratio).item()
                   for lam, l in zip(self.lams(), self.layers))

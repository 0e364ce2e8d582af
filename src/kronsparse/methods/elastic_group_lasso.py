"""Elastic Group LASSO: Group LASSO plus an element-wise l1 term .

Penalty per layer, as the authors weighted it (0.1 * GL + 0.05 * mean|W| is lambda = 0.1 here):

    lambda * (sum_g sqrt(bo*bi) * ||W_g||_F + l1_ratio * mean|W|),   l1_ratio = 0.5

Its exact proximal map is the element-wise soft-threshold (lr*lambda*l1_ratio/numel) followed by
the group shrink (lr*lambda*sqrt(bo*bi)). Note that with the mean the l1 threshold per entry is
tiny next to the group threshold (1/numel of it), so the result is close to Group LASSO. Steering,
revival and freezing are Group LASSO's (group_lasso.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..functional import expand_block_mask, group_lasso_penalty, soft_threshold
from .group_lasso import GroupLassoMethod


def elastic_group_lasso_penalty(W: Tensor, block_shape, l1_ratio: float) -> Tensor:
    """sum_g sqrt(bo*bi) * ||W_g||_F + l1_ratio * mean|W|."""
    return group_lasso_penalty(W, block_shape) + l1_ratio * W.abs().mean()


class ElasticGroupLassoMethod(GroupLassoMethod):
    name = "elastic-group-lasso"
    l1_ratio = 0.5  # the authors' 0.05 / 0.1

    def prox(self, W: Tensor, threshold: float, block_shape=None) -> Tensor:
        """Soft-threshold each entry (the l1 part), then shrink each block (the group part)."""
        bs = block_shape or self.options.block_shape
        t = threshold * self.l1_ratio / W.numel()
        t = expand_block_mask(t, bs) if torch.is_tensor(t) else t  # one per block -> one per entry
        return super().prox(soft_threshold(W, t), threshold, block_shape)

    def penalty_value(self) -> float:
        return sum(lam * elastic_group_lasso_penalty(*self.grid(l.weight), self.l1_ratio).item()
                   for lam, l in zip(self.lams(), self.layers))

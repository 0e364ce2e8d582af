"""The numbers of a run, read only from the final dense weights (no method can flatter itself)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..blocks import matrix_view
from ..costs import choose_path, layer_costs
from ..functional import block_mask_of, check_block_shape
from ..layers import KRON_LAYERS, KronLinear
from ..model_tree import layer_dims, layer_weight


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i: i + batch_size]).argmax(1) == y[i: i + batch_size]).sum().item()
    return correct / len(x)


def sparsity_metrics(weights: list[Tensor], biases: list[Tensor | None], sparse_idx: list[int],
                     block_shape, positions: list[int] | None = None) -> dict:
    """Block and weight sparsity of the layers on the block grid; inference params and MACs of all.

    A conv weight (out, in, kh, kw) is measured on (bo, bi) channel blocks, the kernel whole;
    positions[k]: output positions of layer k (1 for a linear layer), MACs are per sample.
    """
    zero_blocks = total_blocks = zero_weights = grid_weights = 0
    inference_params = inference_macs = 0
    for k, (W, b) in enumerate(zip(weights, biases)):
        nnz = int((W != 0).sum())
        inference_params += nnz + (b.numel() if b is not None else 0)
        at = positions[k] if positions is not None else 1
        if k in sparse_idx:
            check_block_shape(W.shape[0], W.shape[1], block_shape)
            W2, (bo, bik) = matrix_view(W, block_shape)
            mask = block_mask_of(W2, (bo, bik))
            zero_blocks += int((~mask).sum())
            total_blocks += mask.numel()
            zero_weights += W.numel() - nnz
            grid_weights += W.numel()
            inference_macs += int(mask.sum()) * bo * bik * at  # a block-sparse kernel skips zero blocks
        else:
            inference_macs += W.numel() * at
    return {
        "block_sparsity": zero_blocks / total_blocks if total_blocks else 0.0,
        "weight_sparsity": zero_weights / grid_weights if grid_weights else 0.0,
        "inference_params": inference_params,
        "inference_macs": inference_macs,
        "num_blocks": total_blocks,
        "zero_blocks": zero_blocks,
    }


def training_costs(model: nn.Module, batch_size: int) -> dict:
    """Trainable scalars and forward multiply-adds per sample while training, and the path used."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    positions = getattr(model, "positions", [1] * len(model.layers))
    macs, paths = 0, []
    for k, (layer, at) in enumerate(zip(model.layers, positions)):
        if isinstance(layer, KRON_LAYERS) and not isinstance(layer, KronLinear):  # KronConv2d: materialises W
            per_position = layer_weight(layer).numel()
            macs += per_position * at + layer.rank * per_position // batch_size
            paths.append("materialize")
        elif isinstance(layer, KronLinear):
            c = layer_costs(layer.in_features, layer.out_features, layer.block_shape, layer.rank)
            path = layer.path if layer.path != "auto" else choose_path(  # the model's input needs no grad
                layer.in_features, layer.out_features, layer.block_shape, layer.rank, batch_size * at, True, k > 0)
            per_sample = getattr(c.macs, path) * at  # at: the tokens a transformer's layer sees per sample
            if path == "materialize":
                per_sample += c.macs.materialize_build // batch_size
            macs += per_sample
            paths.append(path)
        else:
            macs += layer.weight.numel() * at
            paths.append("dense")
    macs += getattr(model, "attention_macs", 0)  # a transformer's q k^T and attention-weighted v
    bias_adds = sum(layer_dims(l)[1] * at for l, at in zip(model.layers, positions) if l.bias is not None)
    return {"train_params": params, "train_macs": macs, "train_paper_flops": macs + bias_adds,
            "train_paths": paths}


"""A compact vision transformer (ViT/DeiT layout) whose Linear layers come from a layer factory.

The patch embedding (a strided conv) is always a dense nn.Conv2d, as the authors keep it; every
Linear (fused qkv, attention output, MLP in and out, the head) is built by `factory(in, out)`, so
`kron_factory` gives KronLinear wherever the block shape tiles the layer and nn.Linear elsewhere.
No dependency on transformers or timm: pre-norm blocks, a class token, learned position
embeddings, GELU, LayerNorm(eps=1e-6), softmax attention.

Like FeedForward and LeNet5, a ViT exposes `layers` (its weight layers in forward order: patch
embedding, then per block qkv, proj, fc1, fc2, then the head) and `positions` (output positions
of each: patches for the embedding, tokens for the blocks, 1 for the head), which metrics.py reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..model_tree import weight_layers


@dataclass(frozen=True)
class ViTSpec:
    """The shape of a ViT; image_size=None keeps the dataset's own side (no resizing)."""

    hidden: int
    depth: int
    heads: int
    mlp: int
    patch: int
    image_size: int | None = None


# "vit": the hand-tried size for 28x28 inputs; "vit-tiny": DeiT-tiny (the paper's ViT-tiny),
# inputs resized to 224x224 on the fly (bilinear), patch 16: 196 patches + the class token.
VIT_MODELS = {
    "vit": ViTSpec(hidden=64, depth=4, heads=4, mlp=128, patch=7),
    "vit-tiny": ViTSpec(hidden=192, depth=12, heads=3, mlp=768, patch=16, image_size=224),
}


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, factory) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden size {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = factory(dim, 3 * dim)
        self.proj = factory(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # explicit products rather than scaled_dot_product_attention: torch.utils.flop_counter does not
        # count the CPU SDPA kernel, and these two batched GEMMs are part of the training cost we report
        attn = torch.softmax((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5, dim=-1)  # (n, heads, t, t)
        y = attn @ v  # (n, heads, t, d/heads)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, factory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, factory)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = factory(dim, mlp)
        self.fc2 = factory(mlp, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnf.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Inputs (N, C*side*side) or (N, C, side, side); resized to spec.image_size if it differs."""

    def __init__(self, spec: ViTSpec, factory, channels: int, side: int, num_classes: int) -> None:
        super().__init__()
        self.spec, self.channels, self.side = spec, channels, side
        self.image_size = spec.image_size or side
        if self.image_size % spec.patch:
            raise ValueError(f"patch size {spec.patch} does not divide the image side {self.image_size}")
        self.num_patches = (self.image_size // spec.patch) ** 2
        d = spec.hidden
        self.patch_embed = nn.Conv2d(channels, d, spec.patch, stride=spec.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_patches + 1, d))
        self.blocks = nn.ModuleList(Block(d, spec.heads, spec.mlp, factory) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = factory(d, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    @staticmethod
    def sparsify_filter(name: str, module: nn.Module) -> bool:
        """The layers a method may sparsify: every one but the patch embedding, which stays dense."""
        return name != "patch_embed"

    @property
    def layers(self) -> list[nn.Module]:
        """The weight layers in forward order, as they are now (a Sparsifier may have swapped some)."""
        return list(weight_layers(self).values())

    @property
    def positions(self) -> list[int]:
        tokens = self.num_patches + 1
        return [self.num_patches] + [tokens] * (4 * self.spec.depth) + [1]

    @property
    def attention_macs(self) -> int:
        """Multiply-adds per sample of the attention products q k^T and softmax(.) v, all blocks."""
        tokens = self.num_patches + 1
        return self.spec.depth * 2 * tokens * tokens * self.spec.hidden

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(-1, self.channels, self.side, self.side)
        if self.image_size != self.side:
            x = nnf.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, d)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_vit(name: str, factory, num_features: int, num_classes: int, channels: int = 1) -> ViT:
    """ViT `name` (a key of VIT_MODELS) for square images of `channels` channels, flattened."""
    side = math.isqrt(num_features // channels)
    if channels * side * side != num_features:
        raise ValueError(f"model {name!r} needs square images, got {num_features} features per sample")
    model = ViT(VIT_MODELS[name], factory, channels, side, num_classes)
    device = getattr(factory, "device", None)  # budget.py's meta factory: shapes without storage
    return model if device is None else model.to(device)

"""A compact GPT (nanoGPT's shape) over bytes, whose block Linears come from a layer factory.

Token and position embeddings, pre-LayerNorm blocks of causal self-attention (fused qkv, output
projection) and a 4x MLP (GELU), a final LayerNorm, and a head tied to the token embedding. Every
block Linear is built by `factory(in, out)`, so `kron_factory` gives KronLinear wherever the block
shape tiles the layer.

The tied head: the logits are `x @ wte.weight.T`, computed with the embedding's own tensor rather than
through an nn.Linear. No method ever sees it (a Sparsifier finds nn.Linear modules), so it stays dense
and tied, and the trainable parameters count it once. Only the 4 Linears of every block are
sparsified.

Like the ViT, a GPT exposes `layers` (its block Linears in forward order: per block qkv, proj, fc1,
fc2), `positions` (tokens per sample each of them sees: the context) and the multiply-adds no weight
layer accounts for (attention products, the tied head), which metrics.py reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as nnf
from torch import Tensor, nn

from ..model_tree import weight_layers

VOCAB = 256  # bytes


@dataclass(frozen=True)
class GPTSpec:
    """The shape of a GPT: residual width, blocks, heads and context (tokens per sequence)."""

    width: int = 128
    layers: int = 4
    heads: int = 4
    context: int = 128

    def __post_init__(self) -> None:
        for name in ("width", "layers", "heads", "context"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"gpt {name} must be an integer >= 1, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"gpt width {self.width} is not divisible by {self.heads} heads")


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, context: int, factory) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = factory(width, 3 * width)
        self.proj = factory(width, width)
        future = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("future", future, persistent=False)  # (T, T): True where key is after query

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # explicit products (as in vit.py): torch.utils.flop_counter does not count the CPU SDPA kernel
        scores = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5  # (n, heads, t, t)
        attn = torch.softmax(scores.masked_fill(self.future[:t, :t], float("-inf")), dim=-1)
        y = attn @ v  # (n, heads, t, d/heads)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, spec: GPTSpec, factory) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(spec.width)
        self.attn = CausalSelfAttention(spec.width, spec.heads, spec.context, factory)
        self.ln2 = nn.LayerNorm(spec.width)
        self.fc1 = factory(spec.width, 4 * spec.width)
        self.fc2 = factory(4 * spec.width, spec.width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(nnf.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Inputs (N, T) byte ids with T <= context; outputs logits (N, T, 256)."""

    input_dtype = torch.long  # budget.py feeds it token ids, not pixels

    def __init__(self, spec: GPTSpec, factory) -> None:
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(VOCAB, spec.width)
        self.wpe = nn.Embedding(spec.context, spec.width)
        self.blocks = nn.ModuleList(Block(spec, factory) for _ in range(spec.layers))
        self.ln_f = nn.LayerNorm(spec.width)
        nn.init.normal_(self.wte.weight, std=0.02)  # also the head's weight: small logits at the start
        nn.init.normal_(self.wpe.weight, std=0.02)

    @property
    def layers(self) -> list[nn.Module]:
        """The block Linears in forward order, as they are now (a Sparsifier may have swapped some)."""
        return list(weight_layers(self).values())

    @property
    def positions(self) -> list[int]:
        return [self.spec.context] * (4 * self.spec.layers)

    @property
    def attention_macs(self) -> int:
        """Multiply-adds per sequence no weight layer accounts for: q k^T and attention-weighted v
        (computed over the full T x T square, then masked) in every block, and the tied head."""
        t, d = self.spec.context, self.spec.width
        return self.spec.layers * 2 * t * t * d + t * d * VOCAB

    def untracked_activations(self, batch: int) -> int:
        """Activations no submodule returns, per batch of `batch` sequences (budget.py adds them): the
        attention scores, masked scores and weights of every block, and the logits of the tied head."""
        t = self.spec.context
        return batch * (self.spec.layers * 3 * self.spec.heads * t * t + t * VOCAB)

    def rest_tensors(self) -> dict[str, Tensor]:
        """The state outside `layers` (embeddings, norms) by name, for a run's model.safetensors."""
        inside = {f"{name}." for name in weight_layers(self)}
        return {k: v for k, v in self.state_dict().items() if not any(k.startswith(p) for p in inside)}

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        if t > self.spec.context:
            raise ValueError(f"sequence of {t} tokens is longer than the context of {self.spec.context}")
        x = self.wte(idx.long()) + self.wpe.weight[:t]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # the tied head, (N, T, 256)

    @torch.no_grad()
    def generate(self, idx: Tensor, new_tokens: int, temperature: float = 0.8,
                 generator: torch.Generator | None = None) -> Tensor:
        """`idx` (N, T0) followed by `new_tokens` sampled bytes; the model sees the last `context`."""
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        for _ in range(new_tokens):
            logits = self(idx[:, -self.spec.context:])[:, -1] / temperature  # (N, 256)
            probs = torch.softmax(logits.float(), dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def build_gpt(factory, context: int, options: dict | None = None) -> GPT:
    """A GPT with `context` tokens and the width, layers and heads in `options` (GPTSpec's defaults)."""
    spec = GPTSpec(**{k: v for k, v in (options or {}).items() if v is not None}, context=context)
    model = GPT(spec, factory)
    device = getattr(factory, "device", None)  # budget.py's meta factory: shapes without storage
    return model if device is None else model.to(device)

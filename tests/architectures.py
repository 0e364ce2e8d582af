"""Tiny random-init models of real architectures, for tests/test_architectures.py and the guide's tests.

Each builder returns an `Arch`: the model factory (the same initial weights on every call unless a
seed is given), a fixed training batch per step, an evaluation batch, the loss and the output to
compare. Dropout is 0 everywhere so that a resumed run can be bit-identical without RNG state.
timm and torchvision cannot be imported here (every timm release imports torchvision, and no
torchvision build loads with the CPU torch 2.13.0), so the CNNs are transformers' ResNet and
ConvNeXt (depthwise 7x7 convs, pointwise nn.Linear).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

VOCAB, SEQ, BATCH, LABELS = 64, 8, 4, 8


@dataclass
class Arch:
    name: str
    make: Callable[[], nn.Module]
    batch: Callable[[int], dict]  # step -> inputs (with labels)
    loss: Callable[[nn.Module, dict], torch.Tensor]
    output: Callable[[nn.Module, dict], torch.Tensor]

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.make()


def _gen(step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 + step)


def _tokens(step: int) -> dict:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=_gen(step))
    return {"input_ids": ids, "labels": ids}


def _images(step: int, side: int = 16) -> dict:
    g = _gen(step)
    return {"pixel_values": torch.randn(BATCH, 3, side, side, generator=g),
            "labels": torch.randint(0, LABELS, (BATCH,), generator=g)}


def _hf_loss(model, batch):
    return model(**batch).loss


def _hf_logits(model, batch):
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _t5_batch(step: int) -> dict:
    g = _gen(step)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
            "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)}


def _t5_logits(model, batch):
    return model(input_ids=batch["input_ids"], decoder_input_ids=batch["labels"]).logits


def gpt2() -> Arch:
    import transformers as t

    cfg = t.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                       embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return Arch("gpt2", lambda: t.GPT2LMHeadModel(cfg), _tokens, _hf_loss, _hf_logits)


def llama() -> Arch:
    import transformers as t

    cfg = t.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                        bos_token_id=0, eos_token_id=0, pad_token_id=None)
    return Arch("llama", lambda: t.LlamaForCausalLM(cfg), _tokens, _hf_loss, _hf_logits)


def bert() -> Arch:
    import transformers as t

    cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, pad_token_id=0)
    return Arch("bert", lambda: t.BertForMaskedLM(cfg), _tokens, _hf_loss, _hf_logits)


def t5() -> Arch:
    import transformers as t

    cfg = t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                     dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return Arch("t5", lambda: t.T5ForConditionalGeneration(cfg), _t5_batch, _hf_loss, _t5_logits)


def vit() -> Arch:
    import transformers as t

    cfg = t.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=8,
                      patch_size=4, num_channels=3, num_labels=LABELS, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    return Arch("vit", lambda: t.ViTForImageClassification(cfg), lambda s: _images(s, 8), _hf_loss, _hf_logits)


def convnext() -> Arch:
    import transformers as t

    cfg = t.ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                           image_size=16, num_labels=LABELS)
    return Arch("convnext", lambda: t.ConvNextForImageClassification(cfg), _images, _hf_loss, _hf_logits)


def resnet() -> Arch:
    import transformers as t

    cfg = t.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                         num_labels=LABELS)
    return Arch("resnet", lambda: t.ResNetForImageClassification(cfg), _images, _hf_loss, _hf_logits)


class EncoderClassifier(nn.Module):
    """A plain nn.TransformerEncoder classifier (its attention is nn.MultiheadAttention)."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(16, d)
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, LABELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def _seq_batch(step: int) -> dict:
    g = _gen(step)
    return {"x": torch.randn(BATCH, SEQ, 16, generator=g), "labels": torch.randint(0, LABELS, (BATCH,), generator=g)}


def encoder() -> Arch:
    return Arch("encoder", EncoderClassifier, _seq_batch,
                lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["labels"]), lambda m, b: m(b["x"]))


ARCHITECTURES = {f.__name__: f for f in (gpt2, llama, bert, t5, vit, convnext, resnet, encoder)}

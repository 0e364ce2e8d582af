"""Convert a Hugging Face transformers model to Kronecker block-sparse layers, train it, export it.

    pip install -e '.[hf]'   # transformers
    python examples/convert_hf_model.py --out /tmp/bert-kron [--steps 20] [--block 4x4] [--rank 2]

A tiny BERT is built locally from a config (no download), every nn.Linear that the block shape
tiles becomes a KronLinear (`swap_linear_`), and a few steps of masked-token training on random
tokens run with the method's l1 proximal step on S, so some blocks become exactly zero. Then the
model is exported as dense, BSR and factor safetensors files, and the dense export is loaded into
a fresh, plain BertForMaskedLM to check that it gives the same outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from kronsparse import swap_linear_
from kronsparse.blocks import parse_block
from kronsparse.export import export_model, read_export
from kronsparse.functional import soft_threshold
from kronsparse.layers import KRON_LAYERS


def tiny_bert(vocab: int = 128):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    return BertForMaskedLM(config).eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--block", default="4x4", help="OUTxIN")
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--lam", type=float, default=5.0, help="l1 strength on S")
    p.add_argument("--lr", type=float, default=0.01)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = tiny_bert()
    # the output decoder shares its weight with the token embedding: keep it a plain nn.Linear
    report = swap_linear_(model, parse_block(args.block), args.rank, filter_fn=lambda name, m: not name.startswith("cls."))
    print(f"swapped {len(report.swapped)} linear layers, left {len(report.skipped)} dense")
    gates = [m.S for m in model.modules() if isinstance(m, KRON_LAYERS)]
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    for step in range(args.steps):
        tokens = torch.randint(0, model.config.vocab_size, (8, 16))
        loss = model(input_ids=tokens, labels=tokens).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():  # the method's exact zeros: prox of lam * ||S||_1 after every step
            for S in gates:
                S.copy_(soft_threshold(S, args.lr * args.lam))
    model.eval()
    zero = sum(int((S == 0).sum()) for S in gates) / sum(S.numel() for S in gates)
    print(f"final loss {loss.item():.3f}, block sparsity {zero:.3f}")
    out = Path(args.out)
    files = {fmt: export_model(model, out / f"bert.{fmt}.safetensors", fmt, "bert-tiny") for fmt in
             ("dense", "bsr", "factors")}
    plain = tiny_bert()
    plain.load_state_dict(read_export(files["dense"])[1])  # read_export restores the tied names
    tokens = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        diff = (plain(input_ids=tokens).logits - model(input_ids=tokens).logits).abs().max().item()
    print(f"plain BERT from the dense export differs by {diff:.2e}; wrote {', '.join(str(f) for f in files.values())}")
    return {"report": report, "block_sparsity": zero, "max_diff": diff, "files": files, "model": model}


if __name__ == "__main__":
    main()

"""Whole training steps of a transformer: where the method pays in time and memory.

A script, not a test. The model is a Llama (transformers' LlamaForCausalLM built from a config,
random init, a byte vocabulary of 256) of hidden width H, MLP width 4H (SwiGLU: three H x 4H
matrices), --layers decoder layers and heads of 64, trained with AdamW on --tokens tokens per step
(one sequence). Every block Linear of the decoder is sparsified through the Sparsifier; the
embedding and the head stay dense. Variants: dense; block-magnitude (a dense W with block masks);
kron at each --blocks and --ranks, toward 50% of blocks, sparsifying the whole time.

One step = forward + loss, backward, optimizer step, method step (`sp.step`), each phase timed,
medians over --repeats steps after --warmup, variants interleaved round-robin so that background
load hits all alike. Memory: the peak of the whole training state over one step, as the allocator
counts it (benchmarks/memory.py): parameters and optimizer state held between steps, plus the
step's own peak (gradients, activations, temporaries). Beside each measured ratio, the limits the
arithmetic sets: the ratio of multiply-adds of one step (every Linear on the path it runs, forward
and backward, plus attention and the head) and of bytes (dense's measured peak with the sparsified
layers' parameters, gradients and Adam moments replaced by the method's).

    python benchmarks/bench_whole_step.py --widths 256,512,1024 --tokens 512
    python benchmarks/bench_whole_step.py --widths 1024 --blocks 16x16 --ranks 2 --device cuda

Writes benchmarks/results/whole-step-<device>-<date>.json, a markdown table and a plot (.png) of
both ratios against width, one line per setting.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import peak_bytes  # noqa: E402

from kronsparse import Sparsifier  # noqa: E402
from kronsparse.planner import DENSE, plan, setting_name  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PHASES = ("forward", "backward", "optimizer", "method")
VOCAB = 256


def llama(width: int, layers: int, tokens: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                         num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                         max_position_embeddings=tokens, tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def decoder_linears(name: str, module: nn.Module) -> bool:
    return ".layers." in f".{name}" and isinstance(module, nn.Linear)


class Variant:
    """One model with its Sparsifier and optimizer, stepped on a fixed batch."""

    def __init__(self, method: str, block, rank: int, width: int, layers: int, tokens: int, steps: int,
                 device: str, seed: int = 0):
        torch.manual_seed(seed)
        self.model = llama(width, layers, tokens).to(device)
        options = {"rank": rank} if method == "kron" else {}
        target = None if method == "dense" else 0.5
        self.sp = Sparsifier(self.model, method, block_shape=block, total_steps=steps, target_sparsity=target,
                             layers=decoder_linears, **options)
        self.model.to(device)
        self.opt = self.sp.optimizer(torch.optim.AdamW, lr=1e-4, weight_decay=0.01)
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (1, tokens), generator=gen).to(device)
        self.device = device

    def step(self, clock=None) -> dict[str, float]:
        """One training step; with `clock`, the milliseconds of each phase."""
        marks = [clock()] if clock else []
        loss = self.model(input_ids=self.ids, labels=self.ids).loss
        marks += [clock()] if clock else []
        loss.backward()
        marks += [clock()] if clock else []
        self.opt.step()
        marks += [clock()] if clock else []
        self.sp.step(self.opt)
        marks += [clock()] if clock else []
        self.opt.zero_grad(set_to_none=True)
        return {p: (b - a) * 1e3 for p, a, b in zip(PHASES, marks, marks[1:])}

    def held_bytes(self) -> int:
        """Bytes held between steps: parameters, buffers and optimizer state (gradients are freed)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [v for state in self.opt.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def state_bytes(self) -> int:
        """Parameters, gradients and Adam's two moments of the sparsified layers, in bytes."""
        params = [p for layer in self.sp.sparsified_layers().values() for p in layer.parameters()]
        return 4 * sum(p.numel() * p.element_size() for p in params)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(variants: dict[str, Variant], repeats: int, warmup: int, device: str) -> dict[str, dict]:
    def clock():
        sync(device)
        return time.perf_counter()

    phases = {name: {p: [] for p in PHASES} for name in variants}
    for rnd in range(warmup + repeats):
        for name, v in variants.items():
            times = v.step(clock)
            if rnd >= warmup:
                for p, ms in times.items():
                    phases[name][p].append(ms)
    out = {}
    for name, v in variants.items():
        step_ms = [sum(t) for t in zip(*phases[name].values())]
        peak = v.held_bytes() + peak_bytes(v.step, device)
        out[name] = {"step_ms": statistics.median(step_ms),
                     "phase_ms": {p: statistics.median(t) for p, t in phases[name].items()},
                     "peak_bytes": peak, "state_bytes": v.state_bytes()}
    return out


def parse_block(text: str) -> tuple[int, int]:
    bo, _, bi = text.partition("x")
    return int(bo), int(bi)


def run_case(width: int, tokens: int, args) -> list[dict]:
    names = {"dense": ("dense", None, 1)}
    if not args.no_block_magnitude:
        names["block-magnitude"] = ("block-magnitude", (16, 16), 1)
    for block in map(parse_block, args.blocks.split(",")):
        for rank in map(int, args.ranks.split(",")):
            names[f"kron {setting_name(block, rank)}"] = ("kron", block, rank)
    variants = {name: Variant(m, b or (16, 16), r, width, args.layers, tokens, 10 * (args.warmup + args.repeats + 2),
                              args.device) for name, (m, b, r) in names.items()}
    ids = variants["dense"].ids  # the plan's prediction for every setting, from the dense model before training
    predicted = plan(variants["dense"].model, {"input_ids": ids, "labels": ids}, layers=decoder_linears,
                     candidates=[b for m, b, _ in names.values() if m == "kron"],
                     ranks=sorted({r for m, _, r in names.values() if m == "kron"})).settings
    found = measure(variants, args.repeats, args.warmup, args.device)
    dense = found["dense"]
    rows = []
    for name, r in found.items():
        method, block, rank = names[name]
        setting = predicted.get(DENSE if method == "dense" else setting_name(block, rank)) if method != "block-magnitude" \
            else None
        byte_limit = dense["peak_bytes"] - dense["state_bytes"] + r["state_bytes"]
        rows.append({"width": width, "tokens": tokens, "layers": args.layers, "variant": name,
                     "step_ms": r["step_ms"], "phase_ms": r["phase_ms"], "peak_bytes": r["peak_bytes"],
                     "time_ratio": r["step_ms"] / dense["step_ms"], "memory_ratio": r["peak_bytes"] / dense["peak_bytes"],
                     "macs_limit": (setting or predicted[DENSE]).step_macs / predicted[DENSE].step_macs,
                     "bytes_limit": byte_limit / dense["peak_bytes"],
                     "predicted_peak_bytes": setting.peak_bytes if setting else None,
                     "train_params": sum(p.numel() for p in variants[name].model.parameters() if p.requires_grad)})
        print(f"H={width} T={tokens} {name}: {r['step_ms']:.1f} ms ({rows[-1]['time_ratio']:.2f}x, limit "
              f"{rows[-1]['macs_limit']:.2f}x), peak {r['peak_bytes'] / 2**20:.0f} MiB ({rows[-1]['memory_ratio']:.2f}x, "
              f"limit {rows[-1]['bytes_limit']:.2f}x, planned {(setting.peak_bytes / 2**20) if setting else 0:.0f} MiB)",
              flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Whole training step, Llama-shaped decoder, {meta['machine']} ({meta['device']}), torch {meta['torch']}, "
             f"{meta['threads']} threads, {meta['date']}", "", f"Command: `{meta['command']}`", "",
             "Medians of the step's phases in ms; peak: the whole training state's peak over one step. "
             "Limits: multiply-adds and bytes of the step relative to dense (see the script's docstring).", "",
             "| hidden | tokens | variant | train params | step ms | forward | backward | optimizer | method | "
             "time x dense | MAC limit | peak MiB | memory x dense | byte limit | planned peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ph = r["phase_ms"]
        lines.append(f"| {r['width']} | {r['tokens']} | {r['variant']} | {r['train_params']:,} | {r['step_ms']:.1f} | "
                     f"{ph['forward']:.1f} | {ph['backward']:.1f} | {ph['optimizer']:.1f} | {ph['method']:.1f} | "
                     f"{r['time_ratio']:.2f} | {r['macs_limit']:.2f} | {r['peak_bytes'] / 2**20:.1f} | "
                     f"{r['memory_ratio']:.2f} | {r['bytes_limit']:.2f} | "
                     f"{r['predicted_peak_bytes'] / 2**20 if r['predicted_peak_bytes'] else float('nan'):.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.2), sharex=True)
    settings = sorted({(r["variant"], r["tokens"]) for r in rows if r["variant"] != "dense"})
    blocks = sorted({v.split()[1] for v, _ in settings if v.startswith("kron ")})
    token_counts = sorted({t for _, t in settings})
    for (variant, tokens) in settings:  # one colour per block shape, one line style per rank, one marker per token count
        pts = sorted((r["width"], r["time_ratio"], r["memory_ratio"]) for r in rows
                     if r["variant"] == variant and r["tokens"] == tokens)
        widths = [p[0] for p in pts]
        words = variant.split()
        style = ({"color": f"C{1 + blocks.index(words[1])}", "ls": {"r1": ":", "r2": "-", "r4": "--"}.get(words[2], "-.")}
                 if words[0] == "kron" else {"color": "C0", "ls": "-"})
        for ax, k in zip(axes, (1, 2)):
            ax.plot(widths, [p[k] for p in pts], marker="os^D"[token_counts.index(tokens) % 4], ms=4,
                    label=f"{variant}, {tokens} tokens", **style)
    for ax, title in zip(axes, ("step time / dense's", "peak memory / dense's")):
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["width"] for r in rows}), [str(w) for w in sorted({r["width"] for r in rows})])
        ax.set_xlabel("hidden width (MLP 4x)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.83, 0.5))
    fig.suptitle("Whole AdamW training step of a Llama-shaped decoder: the method against dense")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="256,512,1024", help="hidden widths, comma-separated")
    p.add_argument("--tokens", default="512", help="tokens per step, comma-separated")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--blocks", default="8x8,16x16,32x32")
    p.add_argument("--ranks", default="1,2,4")
    p.add_argument("--no-block-magnitude", action="store_true",
                   help="leave block magnitude pruning (a dense step with masks) out: the long token counts' time")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--replot", type=Path, default=None, metavar="JSON", help="only redraw the plot of a result file")
    args = p.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for width in map(int, args.widths.split(",")) for tokens in map(int, args.tokens.split(","))
            for row in run_case(width, tokens, args)]
    meta = {"date": dt.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__, "device": args.device,
            "threads": torch.get_num_threads(), "repeats": args.repeats, "warmup": args.warmup,
            "machine": (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                        else platform.processor() or platform.machine()),
            "command": "python benchmarks/bench_whole_step.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = args.out or RESULTS / f"whole-step-{args.device.split(':')[0]}-{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(markdown(rows, meta))
    plot(rows, out.with_suffix(".png"))
    print(f"\nwrote {out}, its .md and .png")


if __name__ == "__main__":
    main()

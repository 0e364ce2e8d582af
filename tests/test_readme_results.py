"""The result tables and numbers of the README and of docs/ equal the committed files they come from.

Each number in the README's "Results" and in docs/results.md, docs/ablations.md and
docs/performance.md has a file beside it in results/ or benchmarks/results/, written by the command
the page shows; these tests read both and compare, so a table edited by hand, or a file re-run
without updating its page, fails here.
"""

import csv
import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
PAGES = {path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
         for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def section(title: str, page: str | None = None) -> str:
    """The text under the heading `title` (on `page`, or on the one page of the README and docs/ that has
    it), up to the next heading of the same or a higher level."""
    pages = [PAGES[page]] if page else PAGES.values()
    found = [(text, m) for text in pages if (m := re.search(rf"^(#+) {re.escape(title)}\n", text, re.M))]
    assert len(found) == 1, f"{len(found)} pages have the heading {title!r}"
    (text, match), = found
    level = len(match.group(1))
    rest = text[match.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in `text` as rows of stripped cells (the separator row dropped)."""
    found, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def mean(cell: str) -> str:
    """'97.53 ± 0.00' -> '97.53'."""
    return cell.split(" ±")[0]


def table_file_rows(path: Path) -> dict[tuple[str, str], list[str]]:
    """(method, block) -> row of a `kronsparse reproduce` table.md (the first such row: the paper's
    rank 2 comes before a rank-4 row of the same method and block)."""
    (table,) = tables(path.read_text(encoding="utf-8"))
    header = table[0]
    rows = {}
    for r in table[1:]:
        rows.setdefault((r[0], r[1]), dict(zip(header, r)))
    return rows


def test_the_reproduced_table_and_claims_are_the_report():
    text = section("The paper's MNIST table, reproduced")
    report = (ROOT / "results/reproduce-mnist-linear/report.md").read_text(encoding="utf-8")
    assert tables(text)[0] == tables(report)[0]
    claims = [l for l in report.split("## The paper's claims")[1].split("##")[0].splitlines() if l.startswith("- ")]
    readme_claims = [l for l in text.split("The paper's claims, checked")[1].splitlines() if l.startswith("- ")]
    assert readme_claims == claims


QUICK_FILES = {"MLP 784-300-100-10": "results/quick-mnist-mlp/table.md",
               "Fashion-MNIST linear": "results/quick-fashion-linear/table.md"}
QUICK_COLUMNS = {"dense": "dense", "kron (r2)": "kron", "select": "select", "group lasso": "group-lasso",
                 "block RigL": "rigl", "block magnitude": "block-magnitude"}


def test_the_quick_table_is_the_quick_runs_files():
    (table,) = tables(section("Beyond the paper's model (`--quick`: 2 epochs, seed 0)"))
    header, checked = table[0], 0
    for row in table[1:]:
        rows = table_file_rows(ROOT / QUICK_FILES[row[0]])
        block = row[1]
        for column, cell in zip(header[2:], row[2:]):
            method = QUICK_COLUMNS[column]
            key = (method, "select→2x2" if method == "select" else block)
            if cell == "—":  # select picks its block itself: one run, shown in the 2x2 row
                assert method == "select" and block != "2x2", (row[0], block, method)
                continue
            main, *pin = re.findall(r"\d+\.\d+", cell)
            assert main == mean(rows[key]["accuracy %"]), (row[0], block, method)
            if pin:  # "95.84 (88.71 with `--scale-pin decay`)"
                name = re.search(r"--scale-pin (\w+)", cell).group(1)
                assert pin[0] == mean(rows[(f"kron (scale-pin {name})", block)]["accuracy %"])
            checked += 1
    assert checked >= 20


def test_the_selection_table_is_its_summary():
    text = section("Block-size selection in one run")
    summary = (ROOT / "results/selection_vs_separate/summary.md").read_text(encoding="utf-8")
    assert tables(text)[0] == tables(summary)[0]
    gap = re.search(r"gap to the best separate run: (-?\d+\.\d+) points", summary).group(1)
    ratio = re.search(r"\(ratio (\d\.\d+)\)", summary).group(1)
    assert f"{abs(float(gap)):.2f} points *above*" in text and f"in {float(ratio) * 100:.0f}% of" in text


def same(shown: str, exact) -> bool:
    """`shown` is `exact` rounded to the decimals `shown` has."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{float(exact):.{decimals}f}" == shown


def ratio_words(slow: float, fast: float) -> str:
    r = slow / fast
    return f"{r:.2f}x slower" if r >= 1 else f"{1 / r:.2f}x faster"


def test_the_layer_step_table_is_the_benchmark_file():
    text = section("Training speed (CPU)")
    path = re.search(r"\((?:\.\./)?(benchmarks/results/cpu-[\d-]+\.md)\)", text).group(1)
    (bench,) = tables((ROOT / path).read_text(encoding="utf-8"))
    header = bench[0]
    rows = [dict(zip(header, r)) for r in bench[1:]]
    step_table = tables(text)[0]
    assert step_table[0][:4] == ["layer", "block", "rank", "batch"]
    for layer, block, rank, batch, dense, kron, ratio in step_table[1:]:
        size = layer.replace(" → ", "x")

        def find(variant):
            (hit,) = [r for r in rows if r["in x out"] == size and r["block (bo,bi)"] == block and r["r"] == rank
                      and r["tokens"] == batch and r["mode"] == "step" and r["variant"] == variant]
            return hit

        d, k = find("dense"), find("kron:auto")
        kron_ms, path_shown = kron.split(" ms ")
        assert same(dense.removesuffix(" ms"), d["median ms"]) and same(kron_ms, k["median ms"])
        assert path_shown == f"({k['path']})"
        assert ratio == ratio_words(float(k["median ms"]), float(d["median ms"]))


def test_the_whole_model_step_table_is_its_json():
    text = section("Training speed (CPU)")
    path = re.search(r"\[JSON\]\((?:\.\./)?(benchmarks/results/model-step-[^)]+\.json)\)", text).group(1)
    rows = json.loads((ROOT / path).read_text())["rows"]
    table = tables(text)[1]
    assert table[0][:2] == ["model", "block"] and len(table) - 1 == len(rows)
    names = {"linear": "linear", "mlp": "MLP 784-300-100-10"}
    for cells, r in zip(table[1:], rows):
        paths = r["kron_paths"]
        shown = f"{paths[0]} ×{len(paths)}" if len(paths) > 1 and len(set(paths)) == 1 else ", ".join(paths)
        assert cells == [names[r["model"]], "x".join(map(str, r["block_shape"])), str(r["rank"]),
                         f"{r['dense_ms']:.3f} ms", f"{r['kron_ms']:.3f} ms",
                         ratio_words(r["kron_ms"], r["dense_ms"]), shown]


def metrics(path: str) -> dict:
    return json.loads((ROOT / path).read_text())


@pytest.mark.parametrize("title", ["The two commands", "The main job"])
def test_the_main_job_numbers_are_its_metrics_file(title):
    text = section(title)
    m = metrics(re.search(r"\[metrics\.json\]\((?:\.\./)?(results/[^)]+/metrics\.json)\)", text).group(1))
    acc, sparsity = re.search(r"\*\*(\d+\.\d+)% test accuracy at (\d+\.\d+)% block\s+sparsity\*\*", text).groups()
    assert same(acc, 100 * m["test_accuracy"]) and same(sparsity, 100 * m["block_sparsity"])
    assert f"{m['train_params']:,} trainable scalars" in text
    assert same(re.search(r"(\d+\.\d+) s of training", text).group(1), m["wall_seconds"])
    assert m["threads"] == 1 and m["config"]["epochs"] == 10 and m["config"]["standardize"]


def test_the_90_percent_numbers_are_their_metrics_files():
    text = section("The paper's MNIST table, reproduced")
    found = dict(re.findall(r"\(([a-z-]+): (\d+\.\d+)%\)", text))
    assert set(found) == {"kron", "block-magnitude", "rigl", "group-lasso"}
    for method, acc in found.items():
        m = metrics(f"results/sparsity-90-2x2/{method}/metrics.json")
        assert same(acc, 100 * m["test_accuracy"]), method
        assert m["block_sparsity"] == 0.9 and m["config"]["epochs"] == 10 and m["seed"] == 0
    gap = re.search(r"is (\d+\.\d+)\s+points below block magnitude", text).group(1)
    assert same(gap, 100 * (metrics("results/sparsity-90-2x2/block-magnitude/metrics.json")["test_accuracy"]
                           - metrics("results/sparsity-90-2x2/kron/metrics.json")["test_accuracy"]))


def test_the_scale_pin_numbers_are_their_metrics_files():
    text = section("Beyond the paper's model (`--quick`: 2 epochs, seed 0)")
    norm, decay = (metrics(f"results/mlp-scale-pin/{pin}/metrics.json") for pin in ("norm", "decay"))
    assert norm["scale_pin"] == "norm" and decay["scale_pin"] == "decay"
    acc_norm, acc_decay = re.search(r"(\d+\.\d+)% with `norm` against (\d+\.\d+)% with `decay`", text).groups()
    assert same(acc_norm, 100 * norm["test_accuracy"]) and same(acc_decay, 100 * decay["test_accuracy"])
    t_norm, t_decay = re.search(r"(\d+\.\d+) s and (\d+\.\d+) s of training", text).groups()
    assert same(t_norm, norm["wall_seconds"]) and same(t_decay, decay["wall_seconds"])
    for m in (norm, decay):
        assert m["model"] == "mlp" and m["config"]["epochs"] == 10 and m["block_sparsity"] == 0.6
    # the linear model's pins, from the reproduced table
    (table,) = tables(section("The paper's MNIST table, reproduced"))[:1]
    acc = {(r[0], r[1]): mean(r[4]) for r in table[1:] if r[3] != "4"}  # the paper's rank; rank 4 has its own row
    linear = re.search(r"seeds 0-2: (\d+\.\d+)% at 2x2 and (\d+\.\d+)% at 2x16, against (\d+\.\d+)% and\s+(\d+\.\d+)%",
                       text).groups()
    assert list(linear) == [acc[("kron", "2x2")], acc[("kron", "2x16")], acc[("kron (scale-pin norm)", "2x2")],
                            acc[("kron (scale-pin norm)", "2x16")]]


def test_the_gaps_in_the_reproduction_prose_follow_from_the_table():
    text = section("The paper's MNIST table, reproduced")
    (table,) = tables(text)[:1]
    acc = {(r[0], r[1]): float(mean(r[4])) for r in table[1:] if r[3] != "4"}  # rank 2, the paper's; rank 4 below
    gap = {(m, b): acc[("kron", b)] - acc[(m, b)] for m, b in acc if ("kron", b) in acc}

    def shown(number: str, exact: float) -> bool:
        return abs(float(number) - abs(exact)) <= 0.05 + 1e-9

    beats, rigl, magnitude, low, high = re.search(
        r"beats group lasso and elastic group lasso by (\d\.\d) points and\s+block RigL by (\d\.\d) but trails "
        r"gradual block magnitude pruning by (\d\.\d); at 2x16 it trails every\s+baseline by (\d\.\d)–(\d\.\d) points",
        text).groups()
    assert shown(beats, gap[("group-lasso", "2x2")]) and shown(beats, gap[("elastic-group-lasso", "2x2")])
    assert gap[("rigl", "2x2")] > 0 and gap[("block-magnitude", "2x2")] < 0
    assert shown(rigl, gap[("rigl", "2x2")]) and shown(magnitude, gap[("block-magnitude", "2x2")])
    at_equal_sparsity = [-gap[(m, "2x16")] for m in ("group-lasso", "elastic-group-lasso", "rigl", "block-magnitude")]
    assert shown(low, min(at_equal_sparsity)) and shown(high, max(at_equal_sparsity))


def test_the_cost_numbers_in_the_prose_are_the_cost_model():
    from kronsparse import layer_costs

    costs = layer_costs(784, 10, (2, 16), rank=2)
    text = section("The paper's MNIST table, reproduced")
    assert f"({costs.macs.input_first:,} against\n{costs.dense_macs:,};" in text
    assert f"trains {costs.dense_params / costs.train_params:.1f}x fewer parameters" in text


def test_the_epoch_times_and_speed_prose_are_their_files():
    text = section("Training speed (CPU)")
    path = re.search(r"\[JSON\]\((?:\.\./)?(benchmarks/results/epoch-time-[^)]+\.json)\)", text).group(1)
    assert f"> {path}`" in text  # the command shown writes that very file
    result = json.loads((ROOT / path).read_text())
    kron, dense, ratio = re.search(r"epoch of the method takes (\d+\.\d+) s against dense's (\d+\.\d+) s \((\d+\.\d+)x",
                                   text).groups()
    assert same(kron, result["median"]["kron"]) and same(dense, result["median"]["dense"])
    assert same(ratio, result["kron_over_dense"]) and result["threads"] == 1
    bench = (ROOT / re.search(r"\((?:\.\./)?(benchmarks/results/cpu-[\d-]+\.md)\)", text).group(1)).read_text()
    step = {(r[0], r[1], r[4], r[5]): r for r in tables(bench)[0][1:]}
    dense_big, kron_big = step[("2048x2048", "16x16", "step", "dense")], step[("2048x2048", "16x16", "step", "kron:auto")]
    saves, kron_gflops, dense_gflops = re.search(
        r"saves (\d+\.\d+)x the multiply-adds and runs at ~(\d+) GFLOP/s against dense's ~(\d+)", text).groups()
    assert same(saves, int(dense_big[9]) / int(kron_big[9]))
    assert same(kron_gflops, kron_big[10]) and same(dense_gflops, dense_big[10])
    assert f"({step[('784x10', '2x2', 'step', 'dense')][7]} ms in the layer table)" in text
    meta = json.loads((ROOT / re.search(r"\[JSON\]\((?:\.\./)?(benchmarks/results/model-step-[^)]+\.json)\)", text).group(1))
                      .read_text())["meta"]
    assert f"{meta['threads']} thread{'s' if meta['threads'] > 1 else ''}, {meta['date'][:10]}" in text
    assert f"bench_model_step.py --repeats {meta['repeats']} --threads {meta['threads']}`" in text


def test_the_quick_prose_gaps_follow_from_the_quick_table():
    text = section("Beyond the paper's model (`--quick`: 2 epochs, seed 0)")
    rows = table_file_rows(ROOT / QUICK_FILES["MLP 784-300-100-10"])
    acc = {k: float(mean(r["accuracy %"])) for k, r in rows.items()}
    end_2x2, end_2x16, gap_2x2, gap_2x16 = re.search(
        r"the run ends at (\d+\.\d+)% \(2x2\) and (\d+\.\d+)%\s+\(2x16\), still (\d\.\d) and (\d\.\d) points below "
        r"block magnitude", text).groups()
    assert [end_2x2, end_2x16] == [f"{acc[('kron', b)]:.2f}" for b in ("2x2", "2x16")]
    for shown, block in ((gap_2x2, "2x2"), (gap_2x16, "2x16")):
        assert abs(float(shown) - (acc[("block-magnitude", block)] - acc[("kron", block)])) <= 0.05 + 1e-9
    assert f"(2x2: {acc[('kron (scale-pin decay)', '2x2')]:.2f}% at the end)" in text


VIT = "Vision transformers: Table 3 and block-size selection in miniature"


def report_claims(path: Path) -> list[str]:
    report = path.read_text(encoding="utf-8")
    return [l for l in report.split("## The paper's claims")[1].split("\n## ")[0].splitlines() if l.startswith("- ")]


def test_the_vit_tables_and_claims_are_their_reports():
    """Quick run, 3 seeds of the quick setting, the full run: each README table is its table.md,
    and the claims the README lists are those of the full run's report."""
    text = section(VIT)
    files = [tables((ROOT / "results" / name / "table.md").read_text(encoding="utf-8"))[0]
             for name in ("fashion-vit-quick", "fashion-vit-3seeds", "fashion-vit-full")]
    assert tables(text) == files
    readme_claims = [l for l in text.split("The paper's claims over the full run's three seeds")[1].splitlines()
                     if l.startswith("- ")]
    assert readme_claims == report_claims(ROOT / "results/fashion-vit-full/report.md")


def test_the_variants_table_is_its_file():
    text = section("The method's accuracy gap on the ViT")
    (table,) = tables((ROOT / "results/vit-variants/table.md").read_text(encoding="utf-8"))
    assert tables(text)[0] == table


def test_the_steering_ablation_table_is_its_file():
    text = section("Does the penalty earn its place?")
    (table,) = tables((ROOT / "results/steering-ablation/table.md").read_text(encoding="utf-8"))
    assert tables(text)[0] == table


def rows_by(table: list[list[str]], key: tuple[str, ...]) -> dict[tuple[str, ...], dict[str, str]]:
    header = table[0]
    rows = [dict(zip(header, r)) for r in table[1:]]
    return {tuple(r[k] for k in key): r for r in rows}


@pytest.mark.parametrize("title, path", [
    ("The paper's MNIST experiment", "results/reproduce-mnist-linear/table.md"),
    ("The paper's Table 3 in miniature", "results/fashion-vit-full/table.md"),
    ("A language model", "results/pycode-gpt-full/table.md"),
])
def test_the_readme_headline_tables_are_rows_of_their_files(title, path):
    """Each README headline table shows some rows and columns of a committed table, cell for cell."""
    text = section("Results", "README.md").split(f"**{title}**")[1].split("\n**")[0]
    assert path.rsplit("/", 1)[0] + "/" in text  # the table links its folder
    shown = tables(text)[0]  # the headline table (the GPT's quick table follows it: the next test)
    (full,) = tables((ROOT / path).read_text(encoding="utf-8"))
    key = tuple(c for c in ("method", "block (ours)", "block", "rank") if c in shown[0])
    assert set(shown[0]) <= set(full[0]) and len(shown) > 3
    file_rows = rows_by(full, key)
    for row in rows_by(shown, key).values():
        assert {c: file_rows[tuple(row[k] for k in key)][c] for c in shown[0]} == row


def test_the_readme_results_prose_follows_from_the_tables():
    text = " ".join(section("Results", "README.md").split())  # prose, whatever its line breaks
    mnist = rows_by(tables((ROOT / "results/reproduce-mnist-linear/table.md").read_text())[0], ("method", "block (ours)", "rank"))
    vit = rows_by(tables((ROOT / "results/fashion-vit-full/table.md").read_text())[0], ("method", "block", "rank"))

    def params(row):
        return int(row["train params"].replace(",", ""))

    fewer = params(mnist[("dense", "2x16", "")]) / params(mnist[("kron", "2x16", "2")])
    assert f"trains {fewer:.1f}x fewer parameters at 2x16" in text
    assert f"with {params(vit[('dense', '4x4', '')]) / params(vit[('kron', '4x4', '4')]):.2f}x fewer trainable" in text
    kron = float(mean(vit[("kron", "4x4", "4")]["accuracy %"]))
    gaps = [float(mean(vit[(m, "4x4", "")]["accuracy %"])) - kron for m in ("rigl", "block-magnitude")]
    assert f"trails block RigL and block magnitude pruning by {gaps[0]:.1f} and {gaps[1]:.1f} points" in text
    whole = {(r["width"], r["variant"]): r for r in
             json.loads((ROOT / "benchmarks/results/whole-step-cpu-2026-12-07.json").read_text())["rows"]}
    alone = {r["variant"]: r for r in
             json.loads((ROOT / "benchmarks/results/whole-step-h1024-cpu-2026-12-07.json").read_text())["rows"]}
    t1, m1 = f"{alone['kron 16x16 r2']['time_ratio']:.2f}", f"{whole[(1024, 'kron 16x16 r2')]['memory_ratio']:.2f}"
    t2, m2 = (f"{whole[(2048, 'kron 16x16 r2')][k]:.2f}" for k in ("time_ratio", "memory_ratio"))
    assert f"takes {t1}x dense's time and {m1}x its peak memory, at hidden 2048 {t2}x and {m2}x" in text
    long = {r["tokens"]: r for r in json.loads((ROOT / "benchmarks/results/whole-step-tokens-cpu-2026-12-07.json").read_text())[
        "rows"] if r["width"] == 1024 and r["variant"] == "kron 16x16 r2"}
    assert (f"at hidden 1024, {long[2048]['time_ratio']:.2f}x and {long[2048]['memory_ratio']:.2f}x at 2,048 tokens, "
            f"{long[8192]['time_ratio']:.2f}x and {long[8192]['memory_ratio']:.2f}x at 8,192") in text
    rows = json.loads((ROOT / "benchmarks/results/model-step-cpu-2026-12-07.json").read_text())["rows"]
    ratios = [r["kron_ms"] / r["dense_ms"] for r in rows]
    assert f"a whole training step takes {min(ratios):.2f}x to {max(ratios):.2f}x dense's before the ramp" in text
    run = json.loads((ROOT / "benchmarks/results/run-time-mlp-2x2-cpu-2026-12-07.json").read_text())
    assert (run["model"], run["block_shape"], run["epochs"]) == ("mlp", [2, 2], 5)
    assert f"whole 5-epoch run of the MLP at 2x2 takes {run['kron_over_dense']:.2f}x dense's training time" in text


def test_the_whole_step_table_and_claims_are_the_benchmark_file():
    text = section("Whole training steps: where the method pays")
    path = re.search(r"\[JSON\]\((?:\.\./)?(benchmarks/results/whole-step-[^)]+\.json)\)", text).group(1)
    rows = {(r["width"], r["variant"]): r for r in json.loads((ROOT / path).read_text())["rows"]}
    table = tables(text)[0]  # the width sweep at 512 tokens (the long token counts are the next)
    assert len(table) > 10
    for width, variant, params, time_ratio, macs, memory, byte_limit, planned in table[1:]:
        r = rows[(int(width), variant)]
        assert [params, time_ratio, macs, memory, byte_limit] == [
            f"{r['train_params']:,}", f"{r['time_ratio']:.2f}", f"{r['macs_limit']:.2f}", f"{r['memory_ratio']:.2f}",
            f"{r['bytes_limit']:.2f}"]
        assert planned == (f"{r['predicted_peak_bytes'] / r['peak_bytes']:.2f}" if r["predicted_peak_bytes"] else "")
    flat = " ".join(text.split())
    focus = re.search(r"\[table\]\(\.\./(benchmarks/results/whole-step-h1024-[^)]+)\.md\)", flat).group(1)
    alone = {r["variant"]: r for r in json.loads((ROOT / f"{focus}.json").read_text())["rows"]}
    (t1, m1), (t2, m2) = re.findall(r"in (\d\.\d\d)x (?:of dense's step time )?and (\d\.\d\d)x", flat)[:2]
    assert (t1, m1) == (f"{alone['kron 16x16 r2']['time_ratio']:.2f}", f"{rows[(1024, 'kron 16x16 r2')]['memory_ratio']:.2f}")
    wide = rows[(2048, "kron 16x16 r2")]
    assert (t2, m2) == (f"{wide['time_ratio']:.2f}", f"{wide['memory_ratio']:.2f}")
    assert f"not met** ({alone['kron 16x16 r2']['time_ratio']:.2f}x: {alone['kron 16x16 r2']['step_ms']:,.0f} ms" in flat
    assert f"against {alone['dense']['step_ms']:,.0f} ms" in flat
    assert f"**met** ({alone['kron 16x16 r2']['memory_ratio']:.2f}x)" in flat
    bm = [r["time_ratio"] for (_, v), r in rows.items() if v == "block-magnitude"]
    assert f"measured {min(bm):.2f}x-{max(bm):.2f}x dense" in flat
    # the planner: "within 10% of the measured one for dense and for every kron setting ... (0.94x-1.05x)"
    ratios = [r["predicted_peak_bytes"] / r["peak_bytes"] for r in rows.values() if r["predicted_peak_bytes"]]
    assert max(abs(v - 1) for v in ratios) <= 0.10
    assert f"every kron setting of the benchmark above ({min(ratios):.2f}x-{max(ratios):.2f}x)" in flat


def report_section(report: str, title: str) -> list[str]:
    """The bullet lines under `## title` of a report.md."""
    return [l for l in report.split(f"## {title}\n")[1].split("\n## ")[0].splitlines() if l.startswith("- ")]


def test_the_language_model_quick_table_verdicts_and_samples_are_its_report():
    text = section("pycode-gpt quick")
    folder = ROOT / "results/pycode-gpt-quick"
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert tables(text)[0] == tables((folder / "table.md").read_text(encoding="utf-8"))[0]
    bullets = [l for l in text.splitlines() if l.startswith("- ")]
    assert bullets == (report_section(report, "The paper's Table 3 claims on this model")
                       + report_section(report, "Distance to block magnitude pruning, and the goal"))
    for sample in re.findall(r"~~~~\n(.*?)~~~~", text, re.S):
        assert f"~~~~\n{sample}~~~~" in report
    timing = json.loads((folder / "timing.json").read_text())
    real, cpu = timing["real_seconds"], timing["user_seconds"] + timing["sys_seconds"]
    assert f"**{int(real // 60)} min {int(real % 60)} s** wall, {int(cpu // 60)} min {int(cpu % 60)} s of CPU" in text


def test_the_language_model_ablation_table_is_its_files():
    text = section("Where the gap at 16x16 comes from (quick setting)").split("**With the `track` steering")[0]
    (table,) = tables(text)  # the legacy-steering runs (the track ones: the next test)
    header, rows = table[0], {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    quick = table_file_rows(ROOT / "results/pycode-gpt-quick/table.md")
    for name, key in (("kron 16x16 (quick run)", ("kron", "16x16")),
                      ("block-magnitude 16x16 (quick run)", ("block-magnitude", "16x16"))):
        for column in header[1:]:
            assert rows[name][column] == quick[key][column], (name, column)
    for name, folder in (("rank 8 (instead of 4)", "kron-16x16-r8"), ("factor lr 1x (instead of 8x)", "kron-16x16-r4-flr1"),
                         ("sparsify fraction 0.3 (instead of 0.7)", "kron-16x16-r4-sf0.3")):
        m = json.loads((ROOT / "results/pycode-gpt-ablation" / folder / "metrics.json").read_text())
        row = rows[f"kron 16x16, {name}"]
        assert [row["rank"], row["val bpb"], row["test bpb"], row["zero blocks from top-up %"], row["train params"],
                row["fwd MACs/token (ours)"]] == [str(m["rank"]), f"{m['val_bpb']:.3f}", f"{m['test_bpb']:.3f}",
                                                  f"{100 * m['topped_up_blocks'] / m['zero_blocks']:.1f}",
                                                  f"{m['train_params']:,}", f"{m['train_macs'] // m['config']['context']:,}"]


def test_the_language_model_full_table_verdicts_and_samples_are_its_report():
    text = section("pycode-gpt full")
    folder = ROOT / "results/pycode-gpt-full"
    report = (folder / "report.md").read_text(encoding="utf-8")
    assert tables(text)[0] == tables((folder / "table.md").read_text(encoding="utf-8"))[0]
    bullets = [l for l in text.splitlines() if l.startswith("- ")]
    claims = report_section(report, "The paper's Table 3 claims on this model")
    assert bullets == report_section(report, "Distance to block magnitude pruning, and the goal") + claims
    for sample in re.findall(r"~~~~\n(.*?)~~~~", text, re.S):
        assert f"~~~~\n{sample}~~~~" in report
    finished = re.search(r"Only (\d+) of the plan's (\d+) runs", text)
    assert finished is None or f"Partial: {finished.group(1)} of the plan's {finished.group(2)} runs" in report


def test_the_language_model_steering_table_and_prose_are_its_files():
    text = section("Which steering on the full GPT")
    folder = ROOT / "results/pycode-gpt-steering"
    (table,) = tables((folder / "table.md").read_text(encoding="utf-8"))
    assert tables(text)[0] == table
    rows = rows_by(table, ("block", "steering"))
    full = table_file_rows(ROOT / "results/pycode-gpt-full/table.md")
    for block in ("8x8", "16x16"):  # the track rows are the reproduction's own
        assert rows[(block, "track (default)")]["test bpb"] == full[("kron", block)]["test bpb"]
    for name in os.listdir(folder):  # every run of the table is there, with the settings it claims
        if (folder / name).is_dir():
            c = json.loads((folder / name / "config.json").read_text())
            assert name == f"kron-{c['block_shape'][0]}x{c['block_shape'][1]}-r{c['rank']}-{c['steering']}-s{c['seed']}"
            assert (c["model"], c["dataset"], c["width"], c["layers"], c["n_train"]) == ("gpt", "pycode", 128, 4, 16000)

    def mean(block, mode, column="test bpb"):
        return float(rows[(block, mode)][column].split(" ±")[0])

    def std(block, mode):
        return float(rows[(block, mode)]["test bpb"].split("± ")[1])

    flat = " ".join(text.split())
    t16, l16, p16 = (mean("16x16", m) for m in ("track (default)", "legacy", "prune"))
    assert f"costs kron {t16 - l16:.3f} bpb against `legacy` and {t16 - p16:.3f} against `prune`" in flat
    assert f"({std('16x16', 'track (default)'):.3f}), several of the others' ({std('16x16', 'legacy'):.3f}, " \
           f"{std('16x16', 'prune'):.3f})" in flat
    eights = [mean("8x8", m) for m in ("track (default)", "legacy", "prune")]
    assert f"within {max(eights) - min(eights):.3f} of each other" in flat
    assert min(eights) == mean("8x8", "legacy") and min(t16, l16, p16) == l16
    gaps = [mean(b, "legacy") - float(full[("block-magnitude", b)]["test bpb"].split(" ±")[0]) for b in ("8x8", "16x16")]
    assert f"stays {gaps[0]:.3f} bpb behind at 8x8 and {gaps[1]:.3f} at 16x16" in flat


def test_the_language_model_cost_and_saving_prose_follows_from_the_full_table():
    """Every number of the prose from the table: shown values as the table shows them, differences of
    means from table.csv's unrounded means (as the report computes them)."""
    text = " ".join(section("What the method costs, and what it saves").split())
    rows = table_file_rows(ROOT / "results/pycode-gpt-full/table.md")
    exact = {(r["method"], r["block"]): float(r["test_bpb"])
             for r in csv.DictReader((ROOT / "results/pycode-gpt-full/table.csv").open())}
    num = lambda row, col: float(row[col].replace(",", "").split(" ±")[0])  # noqa: E731
    dense, small = rows[("dense", "")], rows[("dense w92", "")]
    for block in ("8x8", "16x16"):
        k = rows[("kron", block)]
        params = num(dense, "train params") / num(k, "train params")
        flops = num(k, "train FLOPs/token (flop_counter)") / num(dense, "train FLOPs/token (flop_counter)")
        assert f"{params:.2f}x fewer parameters" in text and f"{flops:.3f}x" in text
        assert f"{exact[('kron', block)] - exact[('dense', '')]:.3f} bpb against dense" in text
        assert f"{exact[('kron', block)] - exact[('block-magnitude', block)]:.3f} bpb against block magnitude" in text
    assert f"reaches {num(small, 'test bpb'):.3f}" in text
    k4 = exact[("kron", "4x4")]
    assert (f"kron reaches {k4:.3f} bpb, {k4 - exact[('dense', '')]:.3f} above dense ({num(dense, 'test bpb'):.3f}), "
            f"{exact[('block-magnitude', '4x4')] - k4:.3f} below block magnitude pruning at 4x4 "
            f"({exact[('block-magnitude', '4x4')]:.3f}) and {exact[('rigl', '4x4')] - k4:.3f} below block RigL "
            f"({exact[('rigl', '4x4')]:.3f})") in text
    sparse = [v for (m, _), v in exact.items() if not m.startswith("dense")]
    assert min(sparse) == k4 and "the most accurate of the sparse rows" in text


def test_the_readme_language_model_prose_follows_from_its_table():
    text = " ".join(section("Results", "README.md").split("**A language model**")[1].split("**Speed.**")[0].split())
    rows = rows_by(tables((ROOT / "results/pycode-gpt-full/table.md").read_text())[0], ("method", "block"))

    def num(method, block, column):
        return float(rows[(method, block)][column].replace(",", "").split(" ±")[0])

    params, flops = "train params", "train FLOPs/token (flop_counter)"
    fewer = sorted(num("dense", "", params) / num("kron", b, params) for b in ("8x8", "16x16"))
    share = sorted(num("kron", b, flops) / num("dense", "", flops) for b in ("8x8", "16x16"))
    gaps = [num("kron", b, "test bpb") - num("block-magnitude", b, "test bpb") for b in ("8x8", "16x16")]
    assert f"trains {fewer[0]:.0f}-{fewer[1]:.0f}x fewer parameters" in text
    assert f"with {share[0]:.2f}x-{share[1]:.2f}x dense's training FLOPs" in text
    assert f"loses {gaps[0]:.2f} and {gaps[1]:.2f} bits per byte" in text


def test_the_language_model_track_rerun_is_its_files():
    text = section("pycode-gpt quick, with the `track` steering")
    folder = ROOT / "results/pycode-gpt-quick-track"
    assert tables(text)[0] == tables((folder / "table.md").read_text(encoding="utf-8"))[0]
    assert f"{json.loads((folder / 'timing.json').read_text())['real_seconds']} s of wall time" in text
    new, old = (table_file_rows(ROOT / f"results/{name}/table.md") for name in ("pycode-gpt-quick-track", "pycode-gpt-quick"))
    flat = " ".join(text.split())
    bpb = {k: r["test bpb"] for k, r in new.items()}
    gap_new = float(bpb[("kron", "16x16")]) - float(bpb[("block-magnitude", "16x16")])
    gap_old = float(old[("kron", "16x16")]["test bpb"]) - float(old[("block-magnitude", "16x16")]["test bpb"])
    assert f"from {old[('kron', '16x16')]['test bpb']} to {bpb[('kron', '16x16')]} test bits per byte" in flat
    assert f"{gap_new:.3f} behind block magnitude pruning instead of {gap_old:.3f}" in flat
    assert f"({bpb[('kron', '8x8')]} against {bpb[('block-magnitude', '8x8')]})" in flat
    assert f"from {old[('group-lasso', '4x4')]['test bpb']} to {bpb[('group-lasso', '4x4')]}" in flat
    topups = [float(r["zero blocks from top-up %"]) for r in new.values() if r["zero blocks from top-up %"]]
    assert f"at most {max(topups):.1f}% of any method's zero blocks" in flat


def test_the_readme_steering_ablation_table_is_its_files():
    """Each cell of the README's steering table is a mean ± std (or bpb) of the committed file it names."""
    text = section("Methods", "README.md").split("**Which steering?**")[1].split("\n\n", 2)[1]
    (table,) = tables(text)
    ablation = rows_by(tables((ROOT / "results/steering-ablation/table.md").read_text())[0], ("variant",))

    def acc(name, key=("method", "block", "rank"), row=("kron", "4x4", "4"), col="accuracy %"):
        return rows_by(tables((ROOT / f"results/{name}/table.md").read_text())[0], key)[row][col]

    steering = rows_by(tables((ROOT / "results/pycode-gpt-steering/table.md").read_text())[0], ("block", "steering"))

    def bpb(mode):
        return " / ".join(steering[(b, mode)]["test bpb"] for b in ("8x8", "16x16"))

    def steer(prefix, mode):
        return ablation[(f"{prefix}-kron-steer-{mode}",)]["accuracy % (mean ± std over seeds)"]

    expected = [
        [steer("mnist", m) for m in ("track", "legacy", "prune")],
        [steer("sgd-mlp", m) for m in ("track", "legacy", "prune")],
        [acc("fashion-vit-3seeds"), acc("vit-variants", ("variant",), ("kron-lr8",), "accuracy % (mean ± std over seeds)"),
         ablation[("kron-steer-prune",)]["accuracy % (mean ± std over seeds)"]],
        [acc("fashion-vit-full"), acc("fashion-vit-full-legacy"), "—"],
        [bpb("track (default)"), bpb("legacy"), bpb("prune")],
    ]
    assert [row[1:] for row in table[1:]] == expected


def test_the_overhead_floor_prose_is_its_file():
    """The 1.3x target's budget and the kernels whose bits are fixed: every number from the benchmark's file."""
    text = " ".join(section("Training speed (CPU)").split())
    r = json.loads((ROOT / "benchmarks/results/overhead-floor-cpu-2026-12-07.json").read_text())
    dense, kron = r["phases_ms"]["dense"], r["phases_ms"]["kron"]
    assert f"against dense's {r['step_ms']['dense']:.3f} ms, kron spends" in text
    assert (f"{kron['forward'] - dense['forward']:.3f} ms more in forward, {kron['backward'] - dense['backward']:.3f} ms "
            f"more in backward and {kron['method'] - dense['method']:.3f} ms in its own step ({r['ratio']:.2f}x in all)") in text
    assert f"The target leaves {r['budget_ms']:.3f} ms (0.3x dense's step)" in text
    assert f"take {r['fixed_gemms_ms']:.3f} ms of it ({r['fixed_gemms_ms'] / r['budget_ms']:.0%})" in text
    one_pass = r["kernels_ms"]["one pass over a W-sized tensor (copy)"]
    assert f"at memory speed ({one_pass:.3f} ms each)" in text
    assert f"bring the fixed part to {r['floor_ms']:.3f} ms ({r['floor_ms'] / r['budget_ms']:.0%})" in text
    rest = r["step_ms"]["kron"] - r["step_ms"]["dense"] - r["floor_ms"]
    assert f"leaving {r['budget_ms'] - r['floor_ms']:.2f} ms for what takes {rest:.1f} ms today" in text


def test_the_readme_language_model_sample_is_the_reports():
    text = section("Results", "README.md").split("**A language model**")[1].split("**Speed.**")[0]
    (shown,) = re.findall(r"~~~~\n(.*?)~~~~", text, re.S)
    report = (ROOT / "results/pycode-gpt-full/report.md").read_text(encoding="utf-8")
    (sample,) = re.findall(r"### kron 4x4\n\n~~~~\n(.*?)~~~~", report, re.S)
    assert len(shown.splitlines()) >= 3 and sample.startswith(shown)


def test_the_long_token_table_and_prose_are_the_benchmark_file():
    text = section("Whole training steps: where the method pays")
    flat = " ".join(text.split())
    path = "benchmarks/results/whole-step-tokens-cpu-2026-12-07"
    assert f"{path}.json" in flat and f"({path.replace('benchmarks', '../benchmarks')}.md)" in flat
    rows = json.loads((ROOT / f"{path}.json").read_text())["rows"]
    kron = {(r["width"], r["tokens"]): r for r in rows if r["variant"] == "kron 16x16 r2"}
    (table,) = [t for t in tables(text) if t[0][:2] == ["hidden", "tokens"] and "planned / measured peak" in t[0]]
    assert len(table) - 1 == len(kron) == 6
    for width, tokens, params, time_ratio, macs, memory, byte_limit, planned in table[1:]:
        r = kron[(int(width), int(tokens.replace(",", "")))]
        assert [params, time_ratio, macs, memory, byte_limit, planned] == [
            f"{r['train_params']:,}", f"{r['time_ratio']:.2f}", f"{r['macs_limit']:.2f}", f"{r['memory_ratio']:.2f}",
            f"{r['bytes_limit']:.2f}", f"{r['predicted_peak_bytes'] / r['peak_bytes']:.2f}"]
    k2, k8 = kron[(1024, 2048)], kron[(1024, 8192)]
    assert (f"0.38x at 2,048 and {k8['time_ratio']:.2f}x at 8,192, and its peak memory 0.24x, {k2['memory_ratio']:.2f}x "
            f"and {k8['memory_ratio']:.2f}x").replace("0.38x", f"{k2['time_ratio']:.2f}x") in flat
    assert (f"({k8['time_ratio']:.2f}x against a multiply-add limit of {k8['macs_limit']:.2f}x, {k8['memory_ratio']:.2f}x "
            f"against a byte limit of {k8['bytes_limit']:.2f}x)") in flat
    assert f"at hidden 1024 and 2,048 tokens per step, in {k2['time_ratio']:.2f}x and {k2['memory_ratio']:.2f}x" in flat
    ratios = [r["predicted_peak_bytes"] / r["peak_bytes"] for r in rows]
    assert max(abs(v - 1) for v in ratios) <= 0.10
    assert f"predicted peak is {min(ratios):.2f}x-{max(ratios):.2f}x the measured one" in flat


def test_the_language_model_rank_and_width_table_is_its_files():
    text = section("Where the gap at 16x16 comes from (quick setting)").split("**With the `track` steering: rank and width.**")[1]
    (table,) = tables(text)
    rows = {r[0]: dict(zip(table[0], r)) for r in table[1:]}
    quick = table_file_rows(ROOT / "results/pycode-gpt-quick-track/table.md")
    for name, key in (("kron 16x16 (quick run with `track`)", ("kron", "16x16")),
                      ("block-magnitude 16x16 (quick run)", ("block-magnitude", "16x16"))):
        for column in ("rank", "width", "val bpb", "test bpb", "zero blocks from top-up %", "train params",
                       "fwd MACs/token (ours)"):
            assert rows[name][column] == quick[key][column], (name, column)
    for name, folder in (("kron 16x16, rank 8", "kron-16x16-r8-track"), ("kron 16x16, width 256", "kron-16x16-r4-w256"),
                         ("kron 16x16, width 256, rank 8", "kron-16x16-r8-w256"),
                         ("block-magnitude 16x16, width 256", "block-magnitude-16x16-w256")):
        m = json.loads((ROOT / "results/pycode-gpt-ablation" / folder / "metrics.json").read_text())
        c = m["config"]
        assert (c["steering"], c["n_train"], c["layers"], c["seed"]) == ("track", 4000, 2, 0)
        kron = m["method"] == "kron"
        assert [rows[name][k] for k in ("width", "rank", "val bpb", "test bpb", "zero blocks from top-up %", "train params",
                                        "fwd MACs/token (ours)")] == [
            str(c["width"]), str(m["rank"]) if kron else "", f"{m['val_bpb']:.3f}", f"{m['test_bpb']:.3f}",
            f"{100 * m['topped_up_blocks'] / m['zero_blocks']:.1f}" if kron else "", f"{m['train_params']:,}",
            f"{m['train_macs'] // c['context']:,}"]
    flat = " ".join(text.split())
    bpb = {name: float(r["test bpb"]) for name, r in rows.items()}
    gap = lambda kron, bm: f"{bpb[kron] - bpb[bm]:.3f}"  # noqa: E731
    assert f"(+{gap('kron 16x16, rank 8', 'block-magnitude 16x16 (quick run)')} bpb to block magnitude instead of " \
           f"+{gap('kron 16x16 (quick run with `track`)', 'block-magnitude 16x16 (quick run)')})" in flat
    assert f"rank 4, is {gap('kron 16x16, width 256', 'block-magnitude 16x16, width 256')} behind" in flat
    assert f"worse than rank 4 ({gap('kron 16x16, width 256, rank 8', 'block-magnitude 16x16, width 256')} behind)" in flat


def test_the_readme_language_model_quick_table_and_verdict_count_are_their_files():
    text = section("Results", "README.md").split("**A language model**")[1].split("**Speed.**")[0]
    _, shown = tables(text)
    assert "results/pycode-gpt-quick-track/report.md" in text
    quick = rows_by(tables((ROOT / "results/pycode-gpt-quick-track/table.md").read_text())[0], ("method", "block"))
    assert len(shown) == 8
    for row in rows_by(shown, ("method", "block")).values():
        assert {c: quick[(row["method"], row["block"])][c] for c in shown[0]} == row
    claims = report_section((ROOT / "results/pycode-gpt-full/report.md").read_text(encoding="utf-8"),
                            "The paper's Table 3 claims on this model")
    held = sum(c.endswith("— holds.") for c in claims)
    failed = [c for c in claims if not c.endswith("— holds.")]
    assert f"{held} of the paper's {len(claims)} Table 3 claims hold" in " ".join(text.split())
    assert len(failed) == 1 and "fewer training FLOPs" in failed[0]
    seconds = json.loads((ROOT / "results/pycode-gpt-quick-track/timing.json").read_text())["real_seconds"]
    assert f"`--quick --jobs 2`: {round(seconds / 60)} minutes on the 2-core machine" in " ".join(text.split())


def test_the_ramp_prose_is_its_files():
    """The order statistic by sort and the cap's blend: the mid-ramp step ratios and the whole-run times
    in docs/performance.md are those of the benchmark files it links, before and after."""
    text = " ".join(section("Training speed (CPU)").split())
    step = {name: json.loads((ROOT / f"benchmarks/results/model-step-ramp-sort{name}-cpu-2026-12-07.json").read_text())
            for name in ("-before", "-before2", "", "2")}
    assert all(r["meta"]["at"] == 0.3 and r["meta"]["clock"] == "thread" for r in step.values())
    ratio = {k: f"{r['rows'][0]['kron_over_dense']:.2f}" for k, r in step.items()}
    assert f"from {ratio['-before']}x-{ratio['-before2']}x to {ratio['']}x-{ratio['2']}x dense's step" in text
    before, after = (json.loads((ROOT / f"benchmarks/results/run-time-mlp-2x2{k}-cpu-2026-12-07.json").read_text())
                     for k in ("-before", ""))
    assert (f"went from {before['kron_over_dense']:.2f}x to {after['kron_over_dense']:.2f}x dense's training time "
            f"({before['median']['kron']:.2f} s and {after['median']['kron']:.2f} s against "
            f"{before['median']['dense']:.2f} s and {after['median']['dense']:.2f} s;") in text
    assert all(r["kron_last_epoch"] == {"test_accuracy": 0.9752, "block_sparsity": 0.6} for r in (before, after))
    assert "97.52% at 60% in both" in text

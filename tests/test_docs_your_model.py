"""docs/your-model.md runs: its python snippets in order, in one namespace (the page builds on itself),
and a snippet followed by a ```text block prints exactly that block (the Trainer's own log lines,
"{'train_runtime': ...}", aside: they hold timings)."""

import re
import warnings
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "your-model.md"
BLOCKS = re.findall(r"```(python|text)\n(.*?)```", PAGE.read_text(), flags=re.S)


def test_the_page_has_snippets_with_their_output():
    kinds = [k for k, _ in BLOCKS]
    assert kinds.count("python") >= 4 and kinds.count("text") >= 4


@pytest.mark.slow
def test_every_snippet_runs_and_prints_its_text_block(capsys, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for k, (kind, code) in enumerate(BLOCKS):
        if kind != "python":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notices about tiny configs
            exec(compile(code, f"{PAGE}:snippet{k}", "exec"), namespace)
        printed = "".join(line for line in capsys.readouterr().out.splitlines(keepends=True)
                          if not line.startswith("{'train_runtime'"))
        follows = BLOCKS[k + 1] if k + 1 < len(BLOCKS) else ("python", "")
        if follows[0] == "text":
            assert printed == follows[1], f"snippet {k} printed:\n{printed}"

"""docs/your-model.md shows what `print(summary)` gives: each ```text block is checked against the
summary that the python snippet above it builds (tests/test_readme.py runs every snippet of docs/ and
checks its `# VALUE` comments)."""

import re
import warnings
from pathlib import Path

import pytest

PAGE = Path(__file__).resolve().parents[1] / "docs" / "your-model.md"
BLOCKS = re.findall(r"```(python|text)\n(.*?)```", PAGE.read_text(), flags=re.S)
SHOWN = [(code, text) for (kind, code), (next_kind, text) in zip(BLOCKS, BLOCKS[1:])
         if kind == "python" and next_kind == "text"]


def test_the_page_shows_summaries():
    assert len(SHOWN) == 2


@pytest.mark.parametrize("code, text", SHOWN, ids=[f"summary{i}" for i in range(len(SHOWN))])
def test_each_summary_shown_is_what_its_snippet_builds(code, text, tmp_path, monkeypatch, capsys):
    if "import transformers" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notices about tiny configs
        exec(compile(code, str(PAGE), "exec"), namespace)
    assert str(namespace["summary"]) + "\n" == text

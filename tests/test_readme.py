"""Every Python snippet of the README runs, so the documented API cannot rot."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_snippets():
    assert SNIPPETS


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs_and_prints_what_its_comments_say(code, capsys, tmp_path, monkeypatch):
    """A line `print(...)  # VALUE: words` must print VALUE (files the snippet writes go to tmp)."""
    if "from transformers import" in code:
        pytest.importorskip("transformers", reason="pip install -e '.[hf]' for the Hugging Face snippet")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = [m.split(":")[0] for m in re.findall(r"^print\(.*\)\s+# (.*)$", code, flags=re.M)]
    assert len(printed) == len(expected)
    for line, value in zip(printed, expected):
        assert line == value.strip()


def test_ci_runs_exactly_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()

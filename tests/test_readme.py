"""Every Python snippet of the README and of docs/ runs, and every link between them resolves, so the
documented API cannot rot."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "CHANGELOG.md"]
SNIPPETS = [(page, code) for page in PAGES for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)]


def test_readme_has_snippets():
    assert [code for page, code in SNIPPETS if page == README]


@pytest.mark.parametrize("page, code", SNIPPETS,
                         ids=[f"{page.relative_to(ROOT)}-snippet{i}" for i, (page, _) in enumerate(SNIPPETS)])
def test_snippet_runs_and_prints_what_its_comments_say(page, code, capsys, tmp_path, monkeypatch):
    """A line `print(...)  # VALUE: words` must print VALUE (files the snippet writes go to tmp)."""
    if "from transformers import" in code:
        pytest.importorskip("transformers", reason="pip install -e '.[hf]' for the Hugging Face snippet")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(page), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    expected = [m.split(":")[0] for m in re.findall(r"^print\(.*\)\s+# (.*)$", code, flags=re.M)]
    assert len(printed) == len(expected)
    for line, value in zip(printed, expected):
        assert line == value.strip()


def test_ci_runs_exactly_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in README.read_text()


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the headings of `page` (code blocks skipped)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in re.findall(r"^#+ (.*)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and anchor not in anchors(file)):
            broken.append(target)
    return broken


def test_the_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n## A heading (`--x`: y)\n[ok](#a-heading---x-y) [ok](page.md#top) [no](#nope) [no](gone.md)\n")
    assert broken_links(page) == ["#nope", "gone.md"]


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_link_resolves(page):
    assert broken_links(page) == []

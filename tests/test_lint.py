"""ruff (the rules in pyproject.toml: E, F, I) finds nothing in src/, tests/, benchmarks/, tools/, examples/.

ruff is in the `dev` extra (pinned in constraints.txt), so it is in every test environment."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("src", "tests", "benchmarks", "tools", "examples")


def ruff(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_ruff_reports_what_it_should(tmp_path):
    """The check can fail: an unused import and unsorted imports in a scratch file are found."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (tmp_path / "bad.py").write_text("import sys\nimport os\n\nprint(os.sep)\n")
    out = ruff("bad.py", cwd=tmp_path)
    assert out.returncode == 1 and "F401" in out.stdout and "I001" in out.stdout, out.stdout + out.stderr


def test_the_repository_is_clean():
    out = ruff(*PARTS)
    assert out.returncode == 0, out.stdout + out.stderr

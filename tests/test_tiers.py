"""The tier rule of tests/conftest.py (issue 22): every collected test has exactly one tier, the closest declaration
wins, and `-m <tier>` selects by that one tier. Checked on a throw-away test folder with a copy of the conftest."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TESTS = Path(__file__).resolve().parent
INI = """[pytest]
addopts = --strict-markers -p no:cacheprovider
markers =
    unit: u
    e2e: e
    cluster: c
    slow: s
    gpu: g
"""


def run_pytest(tmp_path, body: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "pytest.ini").write_text(INI)
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text("import pytest\n" + body)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)


def test_a_test_overrides_its_modules_tier_and_selection_sees_one_tier(tmp_path):
    body = ("pytestmark = pytest.mark.unit\n"
            "def test_fast(): pass\n"
            "@pytest.mark.e2e\n"
            "def test_long(): pass\n"
            "class TestGroup:\n"
            "    pytestmark = pytest.mark.cluster\n"
            "    def test_in_class(self): pass\n")
    unit = run_pytest(tmp_path, body, "-m", "unit")
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert "test_fast" in unit.stdout and "test_long" not in unit.stdout and "test_in_class" not in unit.stdout
    e2e = run_pytest(tmp_path, body, "-m", "e2e")
    assert "test_long" in e2e.stdout and "test_fast" not in e2e.stdout
    cluster = run_pytest(tmp_path, body, "-m", "cluster")
    assert "test_in_class" in cluster.stdout and "test_fast" not in cluster.stdout


@pytest.mark.parametrize("body, needle", [
    ("def test_untiered(): pass\n", "test_untiered (no tier)"),
    ("pytestmark = [pytest.mark.unit, pytest.mark.e2e]\ndef test_both(): pass\n", "test_both (e2e + unit)"),
])
def test_a_test_without_exactly_one_tier_fails_the_collection(tmp_path, body, needle):
    p = run_pytest(tmp_path, body)
    assert p.returncode == 4, p.stdout + p.stderr  # pytest's usage error: nothing runs
    assert needle in p.stderr and "pytestmark = pytest.mark.<tier>" in p.stderr

"""The README cannot drift from the code: its generated blocks (config names, the support table) are current, and
its examples print what the code prints."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.e2e
def test_generated_blocks_are_current():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "readme_tables.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stderr


def test_the_error_example_is_what_run_py_prints():
    from cl.cli import check_group_overrides

    shown = re.search(r"\$ python run.py (strategy=\S+)\n(error: .*)\n", README)
    assert shown, "the README's error example is missing"
    assert shown.group(2) == f"error: {check_group_overrides([shown.group(1)])}"


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.strip() in README, f"the README's test command differs from .ci/run's: {ci}"

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
    from cl.app.cli import check_group_overrides

    shown = re.search(r"\$ python run.py (strategy=\S+)\n(error: .*)\n", README)
    assert shown, "the README's error example is missing"
    assert shown.group(2) == f"error: {check_group_overrides([shown.group(1)])}"


def test_the_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.strip() in README, f"the README's test command differs from .ci/run's: {ci}"


def test_the_comparison_table_is_the_leaderboard_s_format():
    """The table ending the README's output of `python run.py` is what cl/app/compare.py prints for its numbers (the
    numbers themselves come from a real run; tests/test_default_comparison.py runs one and checks the header)."""
    from cl.app.compare import comparison_table
    from cl.app.leaderboard import SYMBOLS

    start = README.index("What `python run.py` prints")
    block = re.search(r"```text\n(.*?)```", README[start:], re.S).group(1)
    lines = [line for line in block.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    inverse = {v: k for k, v in {**SYMBOLS, "last_acc": "A_last"}.items()}
    results = []
    for line in lines[2:]:
        row = dict(zip((inverse.get(h, h) for h in header), (c.strip() for c in line.strip("|").split("|"))))
        num = lambda key: float(row[key]) if row.get(key) else None  # noqa: E731
        results.append({"strategy": row["strategy"], "scenario": row["scenario"], "backbone": row["backbone"],
                        "seed": 1993, "status": "finished",
                        "metrics": {k: num(k) for k in ("avg_incremental_acc", "last_acc", "forgetting", "bwt")},
                        "costs": {"total_wall_s": num("total_wall_s"), "per_experience": [
                            {"train_images_per_s": num("train_images_per_s"), "peak_memory_mb": num("peak_memory_mb"),
                             "trainable_params": int(row["trainable_params"])}]}})
    order = [r["strategy"] for r in results]
    assert comparison_table(results, order).splitlines() == lines

"""The three places a traceback used to stand where a one-line error is promised (issue 23, point 2), and the
promise that value errors come before the heavy imports.

"Before the heavy imports" is checked as which modules were imported (`python -X importtime` lists every one), not
as a time: torch, timm and every strategy module must be absent when a bad value is reported.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "timm", "torchvision", "strategies", "scenarios", "cl.engine.trainer", "cl.app.experiment")


def run_cli(*args: str, importtime: bool = False) -> subprocess.CompletedProcess:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
                          timeout=600)


def imported_modules(stderr: str) -> list[str]:
    """The module names of `-X importtime`'s lines (`import time: self | cumulative | name`)."""
    return [line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")
            and "|" in line and not line.rstrip().endswith("imported package")]


@pytest.mark.parametrize("arg, needle", [
    ("trainer.lr=-0.1", "trainer.lr must be a finite number >= 0"),
    ("trainer.device=tpu", "unknown trainer.device 'tpu' (did you mean 'cpu'?)"),
    ("trainer.epochs=abc", "trainer.epochs must be an integer"),
    ("trainer.momentum=1.5", "trainer.momentum must be in [0, 1)"),
    ("seed=abc", "seed must be an integer"),
])
def test_value_errors_are_one_line_before_torch_is_imported(tmp_path, arg, needle):
    proc = run_cli(f"results_root={tmp_path}", arg, importtime=True)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert errors == [f"error: {errors[0].removeprefix('error: ')}"] and needle in errors[0], errors
    modules = imported_modules(proc.stderr)
    assert modules, "python -X importtime printed nothing"
    heavy = sorted({m for m in modules for h in HEAVY if m == h or m.startswith(h + ".")})
    assert heavy == [], f"imported before the value error was reported: {heavy[:10]}"
    assert not list(tmp_path.iterdir()), "a bad value must leave no run directory"


def test_truncated_result_of_a_finished_run_is_rebuilt_from_its_checkpoints(tmp_path):
    args = [f"results_root={tmp_path}", "scenario=synthetic", "debug=fast", "trainer.progress=false",
            "trainer.device=cpu", "scenario.limit_per_class=8"]
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    path = Path(first.stdout.strip().splitlines()[-1].removeprefix("result: "))
    intact = json.loads(path.read_text())
    path.write_text(path.read_text()[:300])  # cut mid-file, as a full disk or a crash in a copy would
    again = run_cli(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "rebuilt" in again.stdout
    rebuilt = json.loads(path.read_text())
    assert rebuilt["status"] == "finished"
    assert rebuilt["acc_matrix"] == intact["acc_matrix"]
    assert rebuilt["metrics"] == intact["metrics"]
    assert [c["wall_s"] for c in rebuilt["costs"]["per_experience"]] == \
        [c["wall_s"] for c in intact["costs"]["per_experience"]]
    third = run_cli(*args)  # now an ordinary reload
    assert third.returncode == 0 and "already finished" in third.stdout

"""scripts/benchmark.py: every registered strategy on the scenarios its kinds allow, incompatible pairs skipped
(not failed), one multirun per scenario, then the leaderboard."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def test_plan_covers_every_strategy_and_skips_only_unsupported_kinds():
    import strategies
    from benchmark import TEST_STREAMS, plan

    runs, skipped = plan(None, None)
    planned = {(n, scene) for scene, able in runs for n in able}
    assert {n for n, _ in planned} == set(strategies.names())  # every strategy runs somewhere
    for n, scene in planned:
        assert strategies.get_class(n).supports and scene in TEST_STREAMS.values()
    for n, scene, why in skipped:
        kind = next(k for k, s in TEST_STREAMS.items() if s == scene)
        assert kind not in strategies.get_class(n).supports and kind in why
    assert len(planned) + len(skipped) == len(strategies.names()) * len(TEST_STREAMS)


@pytest.mark.e2e
def test_a_small_benchmark_runs_skips_and_writes_the_leaderboard(tmp_path):
    runs, board = tmp_path / "runs", tmp_path / "board"
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--strategies", "simplecil,source",
                        "--scenarios", "digits", "--seeds", "1,2", "--results-root", str(runs), "--out", str(board),
                        "debug=fast", "trainer.progress=false", "trainer.device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "2 runs (2 seed(s)), 1 incompatible pairs skipped" in p.stdout
    assert len(list(runs.glob("*/result.json"))) == 2
    assert (board / "leaderboard.md").is_file() and "simplecil" in (board / "leaderboard.md").read_text()

"""A run started before issue 22's move (commit d273746, flat `cl/`) resumes with the moved code, bit-exact.

The fixture is that run, stopped after 2 of 5 experiences: `python run.py debug=smoke strategy=simplecil
trainer.stop_after=2` at d273746 (result.json, events and the last checkpoint; 64 KB). Checkpoints hold plain
tensors (`torch.load(weights_only=True)`), so no module path is stored in them; the run hash is that of the
composed config, which the move did not change.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
import pytest

pytestmark = pytest.mark.e2e

FIXTURE = Path(__file__).parent / "fixtures" / "pre22_runs" / "f972a707c5ea21aa"


def test_a_run_from_before_the_move_resumes_bit_exact(tmp_path, compose, run_quiet):
    old_root = tmp_path / "old"
    shutil.copytree(FIXTURE, old_root / FIXTURE.name)
    before = json.loads((FIXTURE / "result.json").read_text())
    assert before["status"] == "partial" and len(before["acc_matrix"]) == 2

    cfg = compose("debug=smoke", "strategy=simplecil")
    cfg["results_root"] = str(old_root)
    path, lines = run_quiet(cfg)
    assert path.parent.name == FIXTURE.name, "the run hash changed: the old run was not found"
    assert any("resum" in line for line in lines), lines
    resumed = json.loads(path.read_text())
    assert resumed["status"] == "finished" and len(resumed["acc_matrix"]) == 5
    assert resumed["acc_matrix"][:2] == before["acc_matrix"]

    fresh_cfg = dict(cfg, results_root=str(tmp_path / "fresh"))
    fresh = json.loads(run_quiet(fresh_cfg)[0].read_text())
    assert fresh["acc_matrix"] == resumed["acc_matrix"]

"""Every registered strategy keeps the result contract (issue 22): run through `run_experiment` on the test stream
of the first kind it supports (scenarios.smoke, the table scripts/benchmark.py uses) at the smallest settings
(debug=smoke), it finishes and writes the result.json the leaderboard, resume and users' scripts read.

One test id per strategy (`-k 'strategy_contract and mos'`), so a new strategy is covered the day it registers."""
import json
import math
from pathlib import Path

import pytest

import strategies
from scenarios.smoke import overrides_for, stream_for

pytestmark = pytest.mark.e2e

RESULT_KEYS = ("schema_version", "run_id", "status", "strategy", "scenario", "backbone", "seed", "acc_matrix",
               "test_counts", "metrics", "costs", "config", "environment", "stream", "warnings", "weights_id",
               "pretrained")
COST_KEYS = ("wall_s", "peak_memory_mb", "trainable_params")
# Columns of acc_matrix per kind when not one per experience: forgetting adds the never-forgotten classes.
EXTRA_COLUMNS = {"forgetting": 1}


@pytest.mark.parametrize("name", strategies.names())
def test_strategy_keeps_the_result_contract(name, compose, run_quiet):
    kind, scenario = stream_for(strategies.get_class(name).supports)
    path, _ = run_quiet(compose(*overrides_for(name, strategies.get_class(name).supports), "debug=smoke"))
    assert Path(path).name == "result.json" and Path(path).is_file()
    result = json.loads(Path(path).read_text())
    assert [k for k in RESULT_KEYS if k not in result] == []
    assert result["status"] == "finished" and result["failure"] is None
    assert (result["strategy"], result["scenario"], result["stream"]["kind"]) == (name, scenario, kind)

    t = result["stream"]["n_experiences"]
    matrix = result["acc_matrix"]
    cols = t + EXTRA_COLUMNS.get(kind, 0)
    assert len(matrix) == t and all(len(row) == cols for row in matrix), f"acc_matrix is not {t} x {cols}"
    assert len(result["test_counts"]) == cols
    assert all(matrix[i][i] is not None for i in range(t)), "an experience was not tested after its training"
    values = [v for row in matrix for v in row if v is not None]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= 100 for v in values), values
    assert isinstance(result["metrics"], dict) and result["metrics"]  # (union_label's `transfer` is NaN unmeasured)

    per_experience = result["costs"]["per_experience"]
    assert len(per_experience) == t
    for cost in per_experience:
        assert [k for k in COST_KEYS if k not in cost] == []
        assert math.isfinite(cost["wall_s"]) and cost["wall_s"] >= 0
    assert math.isfinite(result["costs"]["total_wall_s"]) and result["costs"]["total_wall_s"] > 0

    run_dir = Path(path).parent
    assert (run_dir / "acc_matrix.csv").is_file()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["experience"] for e in events if e["event"] == "experience_end"] == list(range(t))

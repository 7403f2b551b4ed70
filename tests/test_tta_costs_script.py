"""scripts/tta_costs.py (the CTTA cost table of docs/tta.md) runs and prints one row per strategy."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_tta_costs_prints_error_and_cost_rows(capsys):
    spec = importlib.util.spec_from_file_location("tta_costs", ROOT / "scripts" / "tta_costs.py")
    tta_costs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tta_costs)
    tta_costs.main(["--strategies", "source,tent", "trainer.device=cpu"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| source") or line.startswith("| tent")]
    assert len(rows) == 2
    source, tent = ([c.strip() for c in row.strip("|").split("|")] for row in rows)
    assert source[3] == "1.00"  # the ratio column is relative to source
    assert float(tent[1]) < float(source[1])  # TENT adapts below the source model's error (as in test_tta)
    assert float(source[5]) == 0.0 and float(tent[5]) > 0  # only TENT keeps tensors for backward

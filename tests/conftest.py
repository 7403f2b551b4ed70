"""Shared fixtures: configs composed exactly as `run.py` composes them, writing into a temporary results root."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the resolved config dict, quiet, on CPU, with results under tmp_path."""
    from cl.cli import compose_config

    def _compose(*overrides: str) -> dict:
        base = [f"results_root={tmp_path / 'runs'}", "trainer.progress=false", "trainer.device=cpu"]
        return compose_config([*base, *overrides])

    return _compose


@pytest.fixture
def run_quiet():
    """Runs an experiment in-process, collecting what it prints."""
    from cl.experiment import run_experiment

    def _run(cfg: dict) -> tuple[Path, list[str]]:
        lines: list[str] = []
        path = run_experiment(cfg, out=lambda *a: lines.append(" ".join(str(x) for x in a)))
        return path, lines

    return _run

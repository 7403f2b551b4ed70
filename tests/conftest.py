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

# Tests build backbones as the application does: with the test beds' sources registered (cl/app/registry.py).
from cl.app.registry import register_all  # noqa: E402

register_all()


@pytest.fixture
def compose(tmp_path):
    """compose(*overrides) -> the resolved config dict, quiet, on CPU, with results under tmp_path."""
    from cl.app.cli import compose_config

    def _compose(*overrides: str) -> dict:
        base = [f"results_root={tmp_path / 'runs'}", "trainer.progress=false", "trainer.device=cpu"]
        return compose_config([*base, *overrides])

    return _compose


@pytest.fixture
def run_quiet():
    """Runs an experiment in-process, collecting what it prints."""
    from cl.app.experiment import run_experiment

    def _run(cfg: dict) -> tuple[Path, list[str]]:
        lines: list[str] = []
        path = run_experiment(cfg, out=lambda *a: lines.append(" ".join(str(x) for x in a)))
        return path, lines

    return _run


@pytest.fixture(scope="session")
def ops_ext(tmp_path_factory):
    """The csrc/ kernel, built cold ONCE per test session into a temporary CLBENCH_EXT_DIR (issue 10; used by
    tests/test_ops.py and tests/test_ema.py); skips with the reason when ninja or a C++ compiler is missing."""
    import shutil
    import time

    from cl.models import ops

    ninja_here = os.path.exists(os.path.join(os.path.dirname(sys.executable), "ninja"))
    if shutil.which("ninja") is None and not ninja_here:
        pytest.skip("ninja is not installed (pip install -e .[kernels]; the test extra has it)")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        pytest.skip("no C++ compiler on PATH (install g++ or set CXX)")
    if ops._EXT is not None:  # already loaded in this process (CLBENCH_OPS=ext): one operator library per process
        return ops._EXT
    old = os.environ.get("CLBENCH_EXT_DIR")
    os.environ["CLBENCH_EXT_DIR"] = str(tmp_path_factory.mktemp("ext"))  # cold: nothing cached
    ops._EXT = ops._EXT_ERROR = None
    start = time.perf_counter()
    try:
        m = ops.load_extension()
    finally:
        if old is None:
            os.environ.pop("CLBENCH_EXT_DIR", None)
        else:
            os.environ["CLBENCH_EXT_DIR"] = old
    print(f"\n[clbench] cold CPU build of csrc/mean_teacher.cpp: {time.perf_counter() - start:.1f} s")
    assert m is not None, ops.extension_error()
    return m

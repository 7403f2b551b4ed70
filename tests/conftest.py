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


# --- test tiers (issue 22) -----------------------------------------------------------------------------------
# Every test belongs to exactly one tier: a module says `pytestmark = pytest.mark.<tier>` and a test (or class, or
# pytest.param) that differs overrides it with its own decorator. README.md says which command runs which tier.
TIERS = ("unit", "e2e", "cluster", "slow", "gpu")


def _tiers_of(node) -> set[str]:
    return {m.name for m in node.own_markers if m.name in TIERS}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the check sees every collected test
def pytest_collection_modifyitems(config, items):
    """Fails the collection when a test has no tier or two; otherwise leaves each test exactly one tier marker.

    The closest declaration wins (test over class over module), so `-m unit` does not select a test that its
    module marks unit and that overrides it with e2e: the parents' tier markers are moved down onto the tests."""
    bad, tier_of, inherited, parents = [], {}, set(), set()
    for item in items:
        chain = item.listchain()
        closest = next(((node, _tiers_of(node)) for node in reversed(chain) if _tiers_of(node)), None)
        if closest is None or len(closest[1]) > 1:
            bad.append(f"{item.nodeid} ({'no tier' if closest is None else ' + '.join(sorted(closest[1]))})")
            continue
        tier_of[item] = next(iter(closest[1]))
        if closest[0] is not item:
            inherited.add(item)
        parents.update(node for node in chain[:-1] if _tiers_of(node))
    if bad:
        raise pytest.UsageError(
            f"{len(bad)} test(s) without exactly one tier marker (one of {', '.join(TIERS)}): mark the module "
            f"`pytestmark = pytest.mark.<tier>` or the test with a decorator (tests/conftest.py): "
            + ", ".join(bad[:8]) + (", ..." if len(bad) > 8 else ""))
    for node in parents:  # the tier now lives on the tests themselves
        node.own_markers[:] = [m for m in node.own_markers if m.name not in TIERS]
    for item, tier in tier_of.items():
        if item in inherited:
            item.add_marker(tier)
        if tier == "gpu" and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="gpu tier: needs a CUDA device (torch.cuda.is_available() is "
                                                    "False here)"))

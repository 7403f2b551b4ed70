"""scripts/bench.py: a tiny subset of `--cpu` runs in-process and prints its lines with the word `ratio`."""
import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cpu_subset_prints_ratios():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.CPU.update(classes=4, train=4, test=2, tasks=2)  # a smaller stream than --cpu's, same code path
    lines = []
    assert bench.main(["--cpu", "--strategies", "simplecil", "--ceiling-steps", "2", "--no-kernel"],
                      out=lines.append) == 0
    assert len(lines) == 3 and all("ratio" in line for line in lines)
    assert lines[0].startswith("ceiling") and "images/s" in lines[0]
    assert lines[1].startswith("simplecil") and "s/experience" in lines[1] and "peak memory" in lines[1]
    assert lines[2].startswith("loader") and "image cache" in lines[2]


def test_bench_mos_eval_times_both_paths():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    import torch
    s = {**bench.CPU, "classes": 4, "train": 2, "test": 1, "tasks": 2}
    seq, bat, n_sets = bench.mos_eval(s, torch.device("cpu"), repeats=1)
    assert n_sets == 2 and seq > 0 and bat > 0

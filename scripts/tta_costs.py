"""Error and per-batch cost of each continual test-time adaptation strategy on one configuration, in one process.

    .venv/bin/python scripts/tta_costs.py [--scenario synthetic-c] [--strategies source,bn_adapt,tent,cotta,ecotta,psmt]
                                         [extra overrides, e.g. trainer.device=cpu ...]

Each strategy runs `run.py strategy=S scenario=<scenario> debug=fast` (plus the extra overrides) through the same
path as run.py, into a temporary results root, twice: the first pass builds any cache (the synthetic-c source
model) and warms the allocator, the second is printed. Columns are the result's `metrics.mean_error` and
`metrics.cost_per_batch` (time per batch, forward passes per batch, bytes saved for backward, resident state, peak
memory: max RSS on CPU, so not per method there). Times on a shared machine move between runs: read them as ratios
to `source` measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STRATEGIES = ["source", "bn_adapt", "tent", "cotta", "ecotta", "psmt"]


def measure(strategy: str, scenario: str, extra: list[str], root: str) -> dict:
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    cfg = compose_config([f"strategy={strategy}", f"scenario={scenario}", "debug=fast", f"results_root={root}",
                          "trainer.progress=false", *extra])
    path = run_experiment(cfg, out=lambda *a, **k: None)
    return json.loads(Path(path).read_text())["metrics"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default="synthetic-c")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="comma-separated")
    args, extra = parser.parse_known_args(argv)
    rows = {}
    for rep in range(2):
        with tempfile.TemporaryDirectory() as root:
            for s in args.strategies.split(","):
                rows[s] = measure(s, args.scenario, extra, root)
    base = rows.get("source", {}).get("cost_per_batch", {}).get("time_s")
    print(f"scenario={args.scenario} debug=fast {' '.join(extra)}")
    print("| strategy | mean error % | time/batch s | ratio to source | fwd passes/batch | saved for backward MB "
          "| resident state MB | peak memory MB |")
    print("|---|---|---|---|---|---|---|---|")
    for s, m in rows.items():
        c = m["cost_per_batch"]
        ratio = f"{c['time_s'] / base:.2f}" if base else "n/a"
        print(f"| {s} | {m['mean_error']:.2f} | {c['time_s']:.3f} | {ratio} | {c['forward_passes']:.0f} "
              f"| {c['saved_for_backward_mb']:.2f} | {c['resident_state_mb']:.3f} "
              f"| {c['peak_memory_mb']:.0f} ({c['peak_memory_kind']}) |")


if __name__ == "__main__":
    main()

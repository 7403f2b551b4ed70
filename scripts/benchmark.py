#!/usr/bin/env python
"""One command for a benchmark: every strategy (or a chosen subset) on every compatible scenario, over seeds,
locally or on Slurm, with incompatible pairs skipped and listed, then the leaderboard.

    python scripts/benchmark.py                                   # every strategy on its kinds' test streams
    python scripts/benchmark.py --strategies mos,lae,simplecil --scenarios imagenet-r,cifar100 --seeds 1993,1,2
    python scripts/benchmark.py --launcher slurm debug=fast       # one Slurm array per scenario
    python scripts/benchmark.py --dry-run                          # list the runs and the skipped pairs

Each scenario becomes one Hydra multirun (`run.py -m strategy=<its compatible strategies> scenario=<it>
seed=<seeds> <extra overrides>`), so a run is exactly what `python run.py` would run and lands in its
deterministic run directory: an interrupted benchmark started again resumes and reloads what finished. A pair is
compatible when the scenario's kind is in the strategy's `supports` (the same check `run.py` makes); a run that
still fails (missing data, a backbone the method cannot use) is reported and the others go on. At the end the
leaderboard of the results root is written (`scripts/leaderboard.py`).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scenarios.smoke import TEST_STREAMS  # noqa: E402  (each kind's test-sized stream; the contract test's too)


def scenario_kind(name: str) -> str:
    from omegaconf import OmegaConf

    path = ROOT / "configs" / "scenario" / f"{name}.yaml"
    if not path.is_file():
        raise SystemExit(f"error: unknown scenario '{name}': see configs/scenario/")
    cfg = OmegaConf.load(path)
    return str(OmegaConf.select(cfg, "scenario.kind", default="class_il"))


def plan(strategies: list[str] | None, scenarios: list[str] | None) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str, str]]]:
    """[(scenario, [compatible strategies])] and the skipped (strategy, scenario, why)."""
    import strategies as registry

    names = strategies or registry.names()
    for n in names:
        registry.get_class(n)  # a one-line error for an unknown name
    scenes = scenarios or list(TEST_STREAMS.values())
    runs, skipped = [], []
    for scene in scenes:
        kind = scenario_kind(scene)
        able = []
        for n in names:
            supports = registry.get_class(n).supports
            if kind in supports:
                able.append(n)
            else:
                skipped.append((n, scene, f"{n} supports {', '.join(supports)}, not {kind}"))
        if able:
            runs.append((scene, able))
    return runs, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="extra run.py overrides for every run (debug=fast, trainer.epochs=3)")
    ap.add_argument("--strategies", help="comma-separated (default: every registered strategy)")
    ap.add_argument("--scenarios", help="comma-separated (default: each scenario kind's test stream)")
    ap.add_argument("--seeds", default="1993", help="comma-separated seeds (default 1993)")
    ap.add_argument("--launcher", choices=("local", "slurm"), default="local")
    ap.add_argument("--results-root", default="results/runs")
    ap.add_argument("--out", default=None, help="leaderboard folder (default <results-root>/../leaderboard)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs and the skipped pairs, run nothing")
    a = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x] if s else None  # noqa: E731
    runs, skipped = plan(split(a.strategies), split(a.scenarios))
    seeds = split(a.seeds)
    total = sum(len(s) for _, s in runs) * len(seeds)
    print(f"{total} runs ({len(seeds)} seed(s)), {len(skipped)} incompatible pairs skipped"
          + ("" if a.dry_run else " (--dry-run lists them)"))
    if a.dry_run:
        for n, scene, why in skipped:
            print(f"  skip {n} on {scene}: {why}")
    failures = 0
    for scene, able in runs:
        cmd = [sys.executable, str(ROOT / "run.py"), "-m", f"strategy={','.join(able)}", f"scenario={scene}",
               f"seed={','.join(seeds)}", f"results_root={a.results_root}", *a.overrides]
        if a.launcher == "slurm":
            cmd.append("hydra/launcher=slurm")
        print("$ " + " ".join(cmd[1:]), flush=True)
        if a.dry_run:
            continue
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT)
        errors = proc.returncode != 0
        failures += errors
        print(f"{scene}: {'FAILED (exit ' + str(proc.returncode) + ')' if errors else 'done'} in "
              f"{time.time() - t0:.0f}s", flush=True)
    if a.dry_run:
        return 0
    out = a.out or str(Path(a.results_root).parent / "leaderboard")
    board = subprocess.run([sys.executable, str(ROOT / "scripts" / "leaderboard.py"), a.results_root, "--out", out],
                           cwd=ROOT)
    return 1 if failures or board.returncode else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Leaderboard from result.json files: `python scripts/leaderboard.py PATH... [--out DIR]`.

Writes DIR/leaderboard.{md,csv,html,tex} and the plots (png, svg). Real results only by default; `--presets` adds
a "not run" row with the paper's number for every preset in configs/experiment that has no result yet (after the
rows that ran)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cl.app.leaderboard import find_results, write_leaderboard  # noqa: E402


def load_presets(folder: Path) -> dict[str, dict]:
    """preset name -> {strategy, scenario, backbone, paper}, composed by Hydra so defaults are resolved."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    presets = {}
    with initialize_config_dir(str(folder.parent), version_base=None):
        for f in sorted(folder.glob("*.yaml")):
            try:
                cfg = OmegaConf.to_container(compose("config", [f"experiment={f.stem}"]), resolve=False)
            except Exception as e:  # a preset another engineer is still writing must not hide the rest
                print(f"skipping preset {f.stem}: {str(e).splitlines()[0]}", file=sys.stderr)
                continue
            presets[f.stem] = {"strategy": cfg["strategy"]["name"], "scenario": cfg["scenario"]["name"],
                               "backbone": cfg["backbone"]["name"], "paper": cfg.get("paper")}
    return presets


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--out", default="results/leaderboard")
    ap.add_argument("--presets", action="store_true",
                    help="add a 'not run' row (with the paper's number) for every preset without a result")
    ap.add_argument("--no-presets", action="store_true", help=argparse.SUPPRESS)  # the old default; kept for scripts
    a = ap.parse_args(argv)
    results = find_results(a.paths)
    if not results:
        print(f"no result.json under {' '.join(a.paths)}", file=sys.stderr)
        return 2
    presets = load_presets(ROOT / "configs" / "experiment") if a.presets and not a.no_presets else {}
    files = write_leaderboard(results, Path(a.out), presets)
    print(files["md"].read_text())
    print(f"wrote {Path(a.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Random versus pre-trained tiny ViT, side by side: last accuracy (mean ± std over seeds) of each strategy on a
synthetic stream, the table of docs/tiny_vit.md.

    python scripts/tiny_vit_table.py [--strategies simplecil,adam,mos,lae,finetune,joint] [--seeds 1,2,3]
                                     [--difficulty 0.25] [override ...]

Overrides after the options go to every run (e.g. trainer.epochs=2). Runs land in results/tiny-vit (resumable).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from cl.app.cli import compose_config
from cl.app.experiment import run_experiment

# The ordering tests' settings (tests/test_ordering.py): few epochs, so that the table is CI-sized.
SMALL = ["trainer.epochs=2", "strategy.crct_epochs=2"]


def last_accs(strategy: str, backbone: str, seeds: list[int], difficulty: float, overrides: list[str],
              results_root: str) -> list[float]:
    accs = []
    for seed in seeds:
        ov = [f"strategy={strategy}", "scenario=synthetic-hard", f"scenario.synthetic.difficulty={difficulty}",
              f"backbone={backbone}", f"seed={seed}", f"results_root={results_root}", "trainer.progress=false",
              *overrides]
        # strategy.* overrides apply only to the strategy that has the key (crct_epochs is MOS's)
        cfg = compose_config([o for o in ov if strategy == "mos" or not o.startswith("strategy.crct_epochs")])
        accs.append(json.loads(run_experiment(cfg, out=lambda *a: None).read_text())["metrics"]["last_acc"])
    return accs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", default="finetune,simplecil,adam,mos,lae,joint")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--difficulty", type=float, default=0.25)
    p.add_argument("--results-root", default="results/tiny-vit")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    overrides = SMALL + list(a.overrides)
    print(f"synthetic-hard (difficulty {a.difficulty}), last accuracy %, mean ± std over seeds {seeds}; "
          f"overrides: {' '.join(overrides)}")
    print("| strategy | vit-tiny (random) | vit-tiny-pretrained | time (s) |\n|---|---|---|---|", flush=True)
    for strategy in a.strategies.split(","):
        start, cells = time.perf_counter(), []
        for backbone in ("vit-tiny", "vit-tiny-pretrained"):
            accs = last_accs(strategy, backbone, seeds, a.difficulty, overrides, a.results_root)
            sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.1f} ± {sd:.1f} ({', '.join(f'{x:.1f}' for x in accs)})")
        print(f"| {strategy} | {cells[0]} | {cells[1]} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()

"""Orderings the papers report, end to end, on streams where methods separate (issue 21).

- `debug=learn` (CI-sized runs that learn): joint, the upper bound, ends at or above finetune, and both beat chance,
  on digits and on synthetic. (`debug=fast` = `debug=smoke` only checks the code path: 5 steps per experience.)
"""
import json

import pytest


def _last(strategy: str, scenario: str, root, *extra: str) -> float:
    from cl.cli import compose_config
    from cl.experiment import run_experiment

    cfg = compose_config([f"strategy={strategy}", f"scenario={scenario}", "debug=learn", f"results_root={root}",
                          "trainer.progress=false", "trainer.device=cpu", *extra])
    return json.loads(run_experiment(cfg, out=lambda *a: None).read_text())["metrics"]["last_acc"]


@pytest.mark.parametrize("scenario", ["digits", "synthetic"])
def test_debug_learn_joint_at_least_finetune_and_both_above_chance(scenario, tmp_path):
    chance = 10.0  # 10 classes in both streams
    finetune, joint = _last("finetune", scenario, tmp_path), _last("joint", scenario, tmp_path)
    assert finetune > chance + 5, f"finetune at chance under debug=learn on {scenario}: {finetune}"
    assert joint > 2 * chance and joint >= finetune + 10, f"joint {joint} vs finetune {finetune} on {scenario}"

"""Orderings the papers report, end to end, on streams where methods separate (issue 21).

- `debug=learn` (CI-sized runs that learn): joint, the upper bound, ends at or above finetune, and both beat chance,
  on digits and on synthetic. (`debug=fast` = `debug=smoke` only checks the code path: 5 steps per experience.)
"""
import json

import pytest

pytestmark = pytest.mark.e2e


def _last(strategy: str, scenario: str, root, *extra: str) -> float:
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    cfg = compose_config([f"strategy={strategy}", f"scenario={scenario}", "debug=learn", f"results_root={root}",
                          "trainer.progress=false", "trainer.device=cpu", *extra])
    return json.loads(run_experiment(cfg, out=lambda *a: None).read_text())["metrics"]["last_acc"]


@pytest.mark.parametrize("scenario", ["digits", "synthetic"])
def test_debug_learn_joint_at_least_finetune_and_both_above_chance(scenario, tmp_path):
    chance = 10.0  # 10 classes in both streams
    finetune, joint = _last("finetune", scenario, tmp_path), _last("joint", scenario, tmp_path)
    assert finetune > chance + 5, f"finetune at chance under debug=learn on {scenario}: {finetune}"
    assert joint > 2 * chance and joint >= finetune + 10, f"joint {joint} vs finetune {finetune} on {scenario}"


# --- the pre-trained tiny ViT on synthetic-hard ------------------------------------------------------------------
# Measured with scripts/tiny_vit_table.py (docs/tiny_vit.md): SimpleCIL last accuracy over seeds 1, 2, 3 is 77.5,
# 77.5, 77.5 on vit-tiny-pretrained (a frozen backbone: the class order does not change class means) against 56.5,
# 57.5, 52.5 on a random vit-tiny (seed spread 5 points). The margin asserted (10) is twice that spread.
SEEDS = (1, 2, 3)
SMALL = ("trainer.epochs=2",)  # scripts/tiny_vit_table.py's settings (CI-sized)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """CL_DATA when set (reuses a built vit-warmup cache), else a fresh folder (the test pre-trains once, ~1 min)."""
    import os

    return os.environ.get("CL_DATA") or str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hard(tmp_path_factory, data_root):
    """hard(strategy, backbone) -> the last accuracies over SEEDS on synthetic-hard (each run once per module)."""
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    root, memo = tmp_path_factory.mktemp("hard"), {}

    def _run(strategy: str, backbone: str = "vit-tiny-pretrained") -> list[float]:
        if (strategy, backbone) not in memo:
            accs = []
            for seed in SEEDS:
                cfg = compose_config([f"strategy={strategy}", "scenario=synthetic-hard", f"backbone={backbone}",
                                      f"seed={seed}", f"data_root={data_root}", f"results_root={root}",
                                      "trainer.progress=false", "trainer.device=cpu", *SMALL])
                r = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
                assert r["weights_id"].startswith("vit-warmup:") == (backbone == "vit-tiny-pretrained")
                accs.append(r["metrics"]["last_acc"])
            memo[strategy, backbone] = accs
        return memo[strategy, backbone]

    return _run


def test_simplecil_on_the_pretrained_tiny_vit_beats_the_random_one_by_more_than_the_seed_spread(hard):
    pre, rnd = hard("simplecil"), hard("simplecil", "vit-tiny")
    assert all(20 < a < 95 for a in pre), pre  # well below the ceiling, well above chance (10)
    assert min(pre) > max(rnd) + 10, (pre, rnd)


def test_finetune_below_simplecil_on_the_pretrained_tiny_vit(hard):
    """Measured: finetune 17.0, 16.0, 17.0 (it keeps only the last experience) against SimpleCIL's 77.5 x 3."""
    finetune, simplecil = hard("finetune"), hard("simplecil")
    assert max(finetune) + 30 < min(simplecil), (finetune, simplecil)


def test_aper_at_least_simplecil_on_the_pretrained_tiny_vit(hard):
    """APER = prototypes on [frozen, first-session-adapted] features >= SimpleCIL's frozen ones. Measured with
    2 epochs: 77.5 x 3, equal to SimpleCIL to the decimal (as the issue saw on `synthetic`; see docs/tiny_vit.md)."""
    aper, simplecil = hard("adam"), hard("simplecil")
    assert min(aper) >= max(simplecil) - 1, (aper, simplecil)

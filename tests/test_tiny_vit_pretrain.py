"""The pre-trained tiny ViT (cl/app/testbeds/vit_warmup.py, configs/backbone/vit-tiny-pretrained.yaml), the shared
pre-training cache (cl/engine/model_cache.py) and `scenario.synthetic.difficulty`: the pre-training set is disjoint from
every stream, the cache is keyed, atomic, reused and leaves the run's RNG alone, difficulty 0 keeps the old images,
and clip-tiny-xtail's cache key did not move when its cache moved to the shared module."""
import hashlib
import random

import numpy as np
import pytest
import torch

from cl.app.testbeds import vit_warmup as V

pytestmark = pytest.mark.unit


def _digest(*datasets) -> str:
    return hashlib.sha256(b"".join(np.asarray(d.images).tobytes() for d in datasets)).hexdigest()[:16]


def test_difficulty_zero_keeps_the_images_of_before_and_difficulty_changes_them():
    from scenarios.datasets.synthetic import make_synthetic

    # digests of make_synthetic's images before `difficulty` existed (computed on the parent commit)
    assert _digest(*make_synthetic()) == "db8151df85cc94ff"
    assert _digest(*make_synthetic(n_domains=3, seed=2)) == "2c1494a5b5a06864"
    assert _digest(*make_synthetic(difficulty=0.0)) == "db8151df85cc94ff"
    hard_train, _ = make_synthetic(difficulty=1.0)
    plain_train, _ = make_synthetic()
    assert np.array_equal(np.bincount(hard_train.targets), np.bincount(plain_train.targets))
    assert not np.array_equal(hard_train.images, plain_train.images)


def test_bad_difficulty_is_one_clear_error(compose):
    import scenarios
    from cl.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="difficulty"):
        scenarios.build(compose("scenario=synthetic", "scenario.synthetic.difficulty=-1")["scenario"])


def test_pretraining_set_is_disjoint_from_every_stream(compose):
    """Other class patterns (a random-stream tag no stream uses), other images: for the synthetic streams' seeds."""
    from scenarios.datasets.synthetic import _class_pattern, make_synthetic

    w = {**V.DEFAULTS}
    xs, ys = V.pretrain_split(w["n_classes"], 5, 32, 3, w["difficulty"], w["noise"], w["seed"])
    assert xs.shape == (w["n_classes"] * 5, 3, 32, 32) and xs.dtype == torch.uint8
    assert torch.equal(ys.bincount(), torch.full((w["n_classes"],), 5))
    pre = np.stack([_class_pattern(c, 32, 3, w["seed"], tag=V.PATTERN_TAG) for c in range(w["n_classes"])])
    for seed in range(4):  # stream class patterns (any scenario.synthetic.seed draws them under tag 0)
        stream = np.stack([_class_pattern(c, 32, 3, seed) for c in range(100)])
        dist = ((pre[:, None] - stream[None]) ** 2).mean((2, 3, 4))
        assert dist.min() > 1e-3, "a pre-training class equals a stream class"
    seen = set()
    for scenario in ("synthetic", "synthetic-hard"):  # the images those scenarios' streams are cut from
        syn = compose(f"scenario={scenario}")["scenario"]["synthetic"]
        seen |= {img.tobytes() for ds in make_synthetic(**syn) for img in np.asarray(ds.images)}
    assert not any(x.numpy().tobytes() in seen for x in xs)


def _cfg(compose, tmp_path, *extra):
    return compose("backbone=vit-tiny-pretrained", f"data_root={tmp_path / 'data'}", "backbone.warmup.steps=2",
                   "backbone.warmup.per_class=2", *extra)["backbone"]


def test_cache_is_keyed_atomic_reused_and_leaves_the_run_rng_alone(compose, tmp_path, monkeypatch):
    from cl.models.backbones import build

    cfg = _cfg(compose, tmp_path)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    first = build(cfg)  # pre-trains (2 steps) and writes the cache
    expected = (torch.rand(3), np.random.rand(3), random.random())
    files = list((tmp_path / "data" / "vit-warmup-cache").glob("vit-tiny-*.safetensors"))
    assert len(files) == 1 and not list(files[0].parent.glob("*.tmp"))  # written atomically
    assert first.weights_id.startswith("vit-warmup:") and first.pretrained
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    build(cfg)  # from the cache
    rng_cached = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], rng_cached[0]) and np.array_equal(expected[1], rng_cached[1])
    assert expected[2] == rng_cached[2]  # the same draws after a build that trained and one that read the cache
    monkeypatch.setattr(V, "warm_up", lambda *a, **k: pytest.fail("the cached weights were trained again"))
    again = build(cfg)
    assert again.weights_id == first.weights_id
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    random_vit = build(compose("backbone=vit-tiny")["backbone"])
    assert not torch.equal(next(iter(random_vit.model.state_dict().values())),
                           next(iter(again.model.state_dict().values())))
    key = V.cache_path(cfg)[1]
    assert key in first.weights_id
    assert V.cache_path({**cfg, "warmup": {**cfg["warmup"], "cache_dir": "elsewhere", "progress": False}})[1] == key
    for change in ({"seed": 1}, {"steps": 3}, {"difficulty": 0.5}, {"n_classes": 8}):
        assert V.cache_path({**cfg, "warmup": {**cfg["warmup"], **change}})[1] != key
    assert V.cache_path({**cfg, "kwargs": {**cfg["kwargs"], "depth": 2}})[1] != key
    # an explicit weights file skips the pre-training
    assert build({**cfg, "weights": str(files[0])}).weights_id.startswith("file:")


def test_unknown_warmup_key_is_one_clear_error(compose, tmp_path):
    from cl.engine.errors import ConfigError

    cfg = _cfg(compose, tmp_path)
    with pytest.raises(ConfigError, match="unknown key"):
        V.settings_of({**cfg, "warmup": {**cfg["warmup"], "stepz": 3}})


def test_xtail_cache_key_unchanged_by_the_shared_cache(compose):
    """clip-tiny-xtail's default cache file name, as computed before cl/engine/model_cache.py existed."""
    from cl.app.testbeds import xtail_warmup as W

    cfg = compose("scenario=synthetic-xtail", "data_root=/x")["backbone"]
    assert W.cache_path(cfg["model_cfg"], cfg["warmup"])[1] == "b1d685cfec88125e"

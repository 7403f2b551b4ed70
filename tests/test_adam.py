"""APER (adam): the first-session PEFT, the [frozen, adapted] feature concatenation, prototypes, end to end."""
import json

import pytest
import torch

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.unit


def build(*overrides):
    cfg = compose_config(["strategy=adam", "scenario=synthetic", "debug=fast", "trainer.progress=false",
                          "trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    return cfg, stream, strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info)


@pytest.mark.e2e
def test_features_concatenate_the_frozen_and_the_adapted_model():
    cfg, stream, aper = build()
    trainer = Trainer(TrainerConfig.from_mapping(cfg["trainer"]))
    hist = trainer.fit(stream, aper)
    x = torch.rand(3, 3, 32, 32)
    f = aper.features(x)
    d = aper.backbone.feature_dim
    assert f.shape == (3, 2 * d)
    assert torch.allclose(f[:, :d], aper.backbone(x))      # the PTM, untouched
    assert torch.allclose(f[:, d:], aper.adapted(x))
    assert not torch.allclose(f[:, :d], f[:, d:])           # the adapter trained in experience 0
    assert aper.prototypes.shape == (10, 2 * d)
    # only the first experience trains anything
    assert hist.costs[0]["trainable_params"] > 0 and all(c["trainable_params"] == 0 for c in hist.costs[1:])


@pytest.mark.e2e
def test_prototypes_are_class_means_of_the_concatenated_features():
    cfg, stream, aper = build()
    Trainer(TrainerConfig.from_mapping({**cfg["trainer"], "stop_after": 1})).fit(stream, aper)
    exp = stream[0]
    xs = torch.stack([exp.train[i][0] for i in range(len(exp.train))]).float() / 255
    ys = torch.tensor([exp.train[i][1] for i in range(len(exp.train))])
    with torch.no_grad():
        f = aper.features(xs)
    for c in exp.classes:
        assert torch.allclose(aper.prototypes[c], f[ys == c].mean(0), atol=1e-4)


@pytest.mark.parametrize("kind", ["adapter", "ssf", "vpt_deep", "vpt_shallow", "finetune"])
def test_every_peft_variant_trains_only_its_parameters(kind):
    cfg, stream, aper = build(f"strategy.peft={kind}")
    groups = aper.begin_experience(stream[0])
    n = sum(p.numel() for g in groups for p in g["params"])
    total = sum(p.numel() for p in aper.adapted.parameters())
    if kind == "finetune":
        assert n == total + sum(p.numel() for p in aper.first_head.parameters())
    else:
        assert 0 < n < total / 2
    assert not any(p.requires_grad for p in aper.backbone.parameters())


@pytest.mark.e2e
def test_adam_beats_finetune_end_to_end(compose, run_quiet):
    results = {}
    for strategy in ("adam", "finetune"):
        path, _ = run_quiet(compose(f"strategy={strategy}", "scenario=synthetic", "backbone=vit-tiny", "debug=fast"))
        results[strategy] = json.loads(path.read_text())
    assert results["adam"]["metrics"]["last_acc"] > results["finetune"]["metrics"]["last_acc"]
    assert results["adam"]["costs"]["per_experience"][0]["forward_passes_per_test_image"] == 2

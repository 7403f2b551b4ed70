"""simplecil on union_label streams (strategies/simplecil.py): RAIL's zero-shot routing and fusion, hand-computed,
and the end-to-end run on synthetic-xtail."""
import json
import math

import pytest
import torch

pytestmark = pytest.mark.unit


@pytest.fixture
def simplecil(compose):
    import scenarios
    import strategies
    from cl.models.backbones import build

    cfg = compose("strategy=simplecil", "scenario=synthetic-xtail", "backbone=clip-tiny", "scenario.limit_per_class=2")
    stream = scenarios.build(cfg["scenario"])
    strategy = strategies.build({**cfg["strategy"], "fusion_weight": 0.5}, build(cfg["backbone"]), stream.info)
    strategy.zero_shot.scale.fill_(1.0)  # logit scale 1 so that the softmaxes below are exact small fractions
    return strategy


def test_zero_shot_routes_and_prototypes_fuse(simplecil):
    assert simplecil.seen_mask.all()  # the union label space is known from the start
    z = torch.zeros(2, 9)
    z[0, 1] = math.log(2)  # zero-shot picks class 1 -> p = [1, 2, 1, 1, 1, 1, 1, 1, 1] / 10
    z[1, 5] = math.log(2)  # zero-shot picks class 5
    cos = torch.zeros(2, 9)
    cos[:, 1] = math.log(3)  # prototype probabilities over the learned classes 0-2: q = [1, 3, 1] / 5
    # nothing learned yet: pure zero-shot
    assert torch.allclose(simplecil.route(z, cos), z.softmax(1))
    simplecil.proto_counts[:3] = 4  # dataset 0 (classes 0-2) learned
    out = simplecil.route(z, cos)
    assert torch.allclose(out[0], torch.tensor([0.15, 0.4, 0.15] + [0.05] * 6))  # 0.5 p + 0.5 q
    assert torch.allclose(out[1], z[1].softmax(0))  # class 5's dataset not learned: zero-shot stands
    # routed to the learned classes, the prototypes can overrule zero-shot's choice among them
    cos[0] = 0
    cos[0, 0] = 5.0
    assert simplecil.route(z, cos)[0].argmax() == 0


@pytest.mark.e2e
def test_simplecil_runs_on_synthetic_xtail(compose, run_quiet):
    path, lines = run_quiet(compose("strategy=simplecil", "scenario=synthetic-xtail", "debug=fast",
                                    "trainer.eval_future=true"))
    result = json.loads(path.read_text())
    assert result["status"] == "finished" and any(line.startswith("transfer ") for line in lines)
    zero_shot = sum(result["initial_accuracy"]) / len(result["initial_accuracy"])
    assert result["metrics"]["last"] >= zero_shot  # exact prototypes of the learned datasets, zero-shot elsewhere

"""Forgetting metrics (hand-computed) and the GS-LoRA group penalty mechanism."""
import math

import pytest
import torch
from torch import nn

from cl.engine.errors import ConfigError
from cl.models.peft import LoRALinear
from cl.engine.kind_metrics import forget_drop, forgetting_summary, h_mean
from strategies.gs_lora import bounded_forget_loss, group_lasso, lora_groups, prox_group_lasso

pytestmark = pytest.mark.unit


def test_h_mean_hand_computed():
    assert forget_drop(80.0, 20.0) == 60.0
    assert h_mean(40.0, 60.0) == pytest.approx(2 * 40 * 60 / 100)  # 48.0
    assert h_mean(50.0, 0.0) == 0.0


def test_summary_uses_last_request():
    s = forgetting_summary(90.0, [
        {"acc_retain": 88.0, "acc_forget": 2.0, "acc_forget_before": 90.0},
        {"acc_retain": 86.0, "acc_forget": 0.0, "acc_forget_before": 86.0},
    ])
    assert s["acc_retain"] == 86.0 and s["acc_forget"] == 0.0 and s["h_mean"] == pytest.approx(86.0)
    assert s["per_request"][0]["drop"] == 88.0
    with pytest.raises(ConfigError):
        forgetting_summary(90.0, [])


def test_group_lasso_value_and_prox_zeroes_whole_groups():
    torch.manual_seed(0)
    blocks = [[LoRALinear(nn.Linear(4, 4), rank=2), LoRALinear(nn.Linear(4, 4), rank=2)] for _ in range(3)]
    for i, mods in enumerate(blocks):
        for m in mods:
            nn.init.constant_(m.lora_B, 0.01 if i == 0 else 1.0)
    groups = lora_groups(blocks)
    norms = [math.sqrt(sum(float((p.detach() ** 2).sum()) for p in g)) for g in groups]
    assert float(group_lasso(groups).detach()) == pytest.approx(sum(norms), rel=1e-5)
    step = (norms[0] + min(norms[1:])) / 2  # between the small group's norm and the others'
    zeroed = prox_group_lasso(groups, step)
    assert zeroed == [True, False, False]
    assert all(int((p != 0).sum()) == 0 for p in groups[0])
    assert all(int((p != 0).sum()) > 0 for g in groups[1:] for p in g)


def test_bounded_forget_loss_stops_at_bound():
    logits = torch.tensor([[10.0, -10.0]])
    assert float(bounded_forget_loss(logits, torch.tensor([1]), bound=5.0)) == 0.0  # CE=20 > bound
    assert float(bounded_forget_loss(logits, torch.tensor([0]), bound=5.0)) == pytest.approx(5.0, abs=1e-6)


def test_a_cold_original_model_cache_leaves_the_runs_rng_as_a_warm_one(tmp_path):
    """Building synthetic-forget's original model must not reseed the run (it did: a cold cache gave other matrices
    than a warm one under the same run hash)."""
    import torch

    from cl.app.testbeds.synthetic_forget import cached_original

    cfg = {"cache_dir": str(tmp_path), "epochs": 1, "synthetic": {"train_per_class": 4, "test_per_class": 2}}
    draws = []
    for _ in range(2):  # cold, then warm
        torch.manual_seed(123)
        cached_original(cfg)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[1])

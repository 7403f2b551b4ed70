"""GS-LoRA / GS-LoRA++ against a re-statement of the reference step (bjzhb666/GS-LoRA, read at a92fb97), plus the
mechanisms issue 20 names: which LoRA is carried into request t+1, the seeded class shuffle, the CosFace logits,
and the drop measured at the start of the request.

The re-statement below is written from the reference and uses none of the strategy's helpers for what it checks:
- loralib `lora.Linear` forward: F.linear(x, W, b) + x A^T B^T * (lora_alpha / r) (scaling 1/8 at r=8, alpha=1);
- CosFace (vit_pytorch_face/vit_face.py:171-206): s * (cos - m * onehot(y)), cos = normalize(x) normalize(W)^T;
- the step (engine_cl.py:59-125): loss_remain = CE(model(x_r, y_r)), loss_forget = relu(BND - CE(model(x_f, y_f))),
  structure = sum over blocks of sqrt(sum of squares of the block's 4 LoRA matrices) (engine_cl.py:349-432),
  prototype = w_f * relu(BND_pro - KL_f) + w_r * KL_r with KL = kl_div(log_softmax(emb), log_softmax(proto),
  batchmean, log_target) (engine_cl.py:571-601); total = beta loss_forget + loss_remain + alpha structure + proto;
  AdamW (timm create_optimizer, wd 0.05 on the 2-D LoRA matrices);
- prototypes (util/utils.py:502-540): per-class mean embedding of the request's forget + remain subsets, frozen model.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.models.backbones import Backbone
from cl.engine.data import to_model_input
from cl.models.heads import CosFaceHead
from cl.models.peft import LoRALinear
from cl.engine.strategy import Batch
from cl.engine.kind_metrics import forgetting as from_history
from scenarios.kinds.forgetting import build_forgetting, forget_requests
from cl.app.testbeds.synthetic_forget import make_vit
from strategies.gs_lora import GSLoRA, GSLoRAPP

pytestmark = pytest.mark.unit

SYN = {"n_classes": 6, "image_size": 32, "train_per_class": 10, "test_per_class": 4, "seed": 0}
BND, ALPHA, BETA, LR, WD = 105.0, 1e-4, 0.2, 1e-2, 0.05


def _stream():
    return build_forgetting({"name": "f", "dataset": "synthetic", "synthetic": SYN, "n_requests": 2,
                             "forget_per_request": 2, "val_fraction": 0.2})


def _strategy(cls=GSLoRA, head="cosface", **hp):
    torch.manual_seed(0)
    body = make_vit({"embed_dim": 32, "depth": 2, "num_heads": 2})
    bb = Backbone(body, name="t", arch="vit", feature_dim=32, input_size=32, in_chans=3, normalize="none",
                  weights_id="random", pretrained=True)
    bb.head = CosFaceHead(32, 6) if head == "cosface" else nn.Linear(32, 6)
    stream = _stream()
    s = cls(**{"val_every": 10_000, **hp})
    s.setup(bb, stream.info)
    return s, stream


# --- the re-statement ------------------------------------------------------------------------------------------


class RefLoRALinear(nn.Module):
    """loralib lora.Linear.forward (r > 0, not merged, no dropout)."""

    def __init__(self, weight, bias, A, B, scaling):
        super().__init__()
        self.weight, self.bias = nn.Parameter(weight.clone(), False), nn.Parameter(bias.clone(), False)
        self.lora_A, self.lora_B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
        self.scaling = scaling

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling


def reference_model(s):
    """A copy of the strategy's model with every LoRA layer replaced by the loralib re-statement."""
    body = copy.deepcopy(s.backbone.model if hasattr(s.backbone, "model") else s.backbone)
    blocks = []
    for name, m in list(body.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, LoRALinear):
                ref = RefLoRALinear(child.weight.detach(), child.bias.detach(), child.lora_A.detach(),
                                    child.lora_B.detach(), child.alpha / child.rank)
                setattr(m, child_name, ref)
                blocks.append(ref)
    for p in body.parameters():
        p.requires_grad_(False)
    lora = [p for r in blocks for p in (r.lora_A, r.lora_B)]
    for p in lora:
        p.requires_grad_(True)
    groups = [blocks[i:i + 2] for i in range(0, len(blocks), 2)]  # (fc1, fc2) of each block
    head_w = s.head.weight.detach().clone()
    return body, lora, groups, head_w


def ref_cosface(emb, w, y, scale=64.0, margin=0.35):
    cos = F.normalize(emb) @ F.normalize(w).T
    if y is None:
        return scale * cos
    return scale * (cos - margin * F.one_hot(y, cos.shape[1]).float())


def ref_step_loss(body, groups, head_w, x_r, y_r, x_f, y_f, protos=None, w_f=0.0, w_r=0.0, bnd_pro=50.0):
    emb_r, emb_f = body(x_r), body(x_f)
    loss_remain = F.cross_entropy(ref_cosface(emb_r, head_w, y_r), y_r)
    loss_forget = F.relu(BND - F.cross_entropy(ref_cosface(emb_f, head_w, y_f), y_f))
    structure = sum(torch.sqrt(sum((p ** 2).sum() for r in g for p in (r.lora_A, r.lora_B))) for g in groups)
    total = loss_forget * BETA + loss_remain + structure * ALPHA
    if protos is not None:
        kl = lambda e, y: F.kl_div(F.log_softmax(e, 1), F.log_softmax(protos[y], 1), reduction="batchmean",
                                   log_target=True)
        total = total + w_f * F.relu(bnd_pro - kl(emb_f, y_f)) + w_r * kl(emb_r, y_r)
    return total


def _batches(stream, n_steps, size=6):
    """Fixed (retain, forget) batches from request 0's data."""
    exp = stream[0]
    xs, ys = zip(*[exp.train[i] for i in range(len(exp.train))])
    x, y = to_model_input(torch.stack(xs), 32, 3, "cpu"), torch.as_tensor(ys)
    forget = torch.isin(y, torch.as_tensor(exp.classes))
    xr, yr, xf, yf = x[~forget], y[~forget], x[forget], y[forget]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n_steps):
        i, j = torch.randint(len(yr), (size,), generator=g), torch.randint(len(yf), (size,), generator=g)
        out.append((xr[i], yr[i], xf[j], yf[j]))
    return out


def _compare_steps(cls, **hp):
    s, stream = _strategy(cls, **hp)
    s.observe_classes(stream[0])
    params = s.begin_experience(stream[0])
    protos = None
    if s.prototype:  # the reference's calculate_prototypes, re-stated on the same request data
        exp = stream[0]
        xs, ys = zip(*[exp.train[i] for i in range(len(exp.train))])
        body0 = copy.deepcopy(s.backbone).eval()
        with torch.no_grad():
            emb = body0(to_model_input(torch.stack(xs), 32, 3, "cpu"))
        ys = torch.as_tensor(ys)
        protos = torch.zeros(6, 32)
        for c in ys.unique():
            protos[c] = emb[ys == c].mean(0)
        torch.testing.assert_close(s.prototypes, protos, atol=1e-5, rtol=1e-5)
    body, lora, groups, head_w = reference_model(s)
    body.train()
    s.train()
    opt_s = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    opt_r = torch.optim.AdamW(lora, lr=LR, weight_decay=WD)
    w_f = s.pro_f[0] if s.prototype else 0.0
    for k, (xr, yr, xf, yf) in enumerate(_batches(stream, 3)):
        s.forget_batch = lambda size, xf=xf, yf=yf: (xf, yf)  # the forget cycle is tested in test_gs_lora.py
        loss_s = s.train_step(Batch(xr, yr))
        loss_r = ref_step_loss(body, groups, head_w, xr, yr, xf, yf, protos, w_f=w_f, w_r=s.pro_r)
        torch.testing.assert_close(loss_s, loss_r, atol=1e-5, rtol=1e-5)
        opt_s.zero_grad()
        opt_r.zero_grad()
        loss_s.backward()
        loss_r.backward()
        if k == 0:
            for a, b in zip(params, lora):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
        opt_s.step()
        opt_r.step()
        s.after_optimizer_step()
    for a, b in zip(params, lora):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-4)
    s.eval()
    body.eval()
    x = _batches(stream, 1)[0][0]
    with torch.no_grad():
        torch.testing.assert_close(s.predict(x), ref_cosface(body(x), head_w, None), atol=1e-4, rtol=1e-4)


def test_gs_lora_step_matches_the_reference_restatement():
    _compare_steps(GSLoRA, beta=[BETA], bound=BND, lasso_alpha=ALPHA)


def test_gs_lora_pp_step_matches_the_reference_restatement():
    _compare_steps(GSLoRAPP, beta=[BETA], bound=BND, lasso_alpha=ALPHA, pro_f_weight=0.01, pro_r_weight=0.5,
                   bound_pro=50.0)


# --- mechanisms --------------------------------------------------------------------------------------------------


def test_the_final_lora_not_the_best_validation_one_is_carried_into_the_next_request():
    """Reference train_own_forget_cl.py:1695-1704 saves the final state, :524-536 loads it for the next request.
    Two states of request 0's LoRA: X (validation H high) then Y (validation H low, the final one). Request 1 must
    start from W + scaling * B_Y A_Y, with a fresh no-op LoRA."""
    s, stream = _strategy(head="linear", val_every=1)
    s.observe_classes(stream[0])
    s.begin_experience(stream[0])
    assert s._val is not None
    s._val_before = 100.0  # the validation forget accuracy at the request's start
    accs = iter([(90.0, 0.0), (10.0, 80.0)])  # (retain, forget): H(X) = 94.7, H(Y) = H(final) = 13.3
    current = {}
    s._val_acc = lambda which: current[which]

    def set_state(value):
        with torch.no_grad():
            for m in s._loras:
                m.lora_B.fill_(value)
        current.clear()
        current.update(zip(("retain", "forget"), next(accs)))

    w0 = [m.weight.detach().clone() for m in s._loras]
    set_state(0.01)
    s.after_optimizer_step()  # X: validation H = 2 * 90 * d / (d + 90) with d = before - 0
    set_state(0.02)
    final = [(m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.scaling) for m in s._loras]
    s.after_optimizer_step()  # Y: a lower H
    s.end_experience(stream[0], None)
    log = s.request_log[-1]
    assert log["val_h_best"] > log["val_h_final"]  # the best state was X, yet...
    s.observe_classes(stream[1])
    s.begin_experience(stream[1])
    for m, w, (A, B, sc) in zip(s._loras, w0, final):  # ...request 1 starts from Y merged
        torch.testing.assert_close(m.weight.detach(), w + sc * B @ A, atol=1e-6, rtol=1e-6)
        assert int(torch.count_nonzero(m.lora_B)) == 0


def test_forgotten_classes_follow_the_references_seeded_shuffle():
    """train_own_forget_cl.py:198-203 (order_list shuffled by random.seed(SEED), SEED = 1337 in config.py) and
    :538-545 (task i forgets order_list[NUM_FIRST - i * PER : NUM_FIRST - i * PER + PER])."""
    random.seed(1337)
    order_list = list(range(100))
    random.shuffle(order_list)
    num_first, per = 80, 20
    expected = []
    for task_i in range(4):
        en1 = num_first - task_i * per
        expected.append(sorted(order_list[en1:en1 + per]))
    assert forget_requests(100, {"n_requests": 4, "forget_per_request": 20}) == expected
    assert forget_requests(100, {"n_requests": 4, "forget_per_request": 20, "class_order_seed": 1337}) == expected
    assert expected[0] != list(range(80, 100))  # the label order the old version took
    assert forget_requests(100, {"n_requests": 1, "forget_per_request": 20, "class_order_seed": None}) == \
        [list(range(80, 100))]
    stream = build_forgetting({"name": "f", "dataset": "synthetic", "n_requests": 2, "forget_per_request": 2,
                               "synthetic": {**SYN, "n_classes": 10}})
    assert [e.classes for e in stream] == [[8, 9], [4, 5]]  # the synthetic-forget scenario's requests


def test_cosface_logits_hand_checked():
    head = CosFaceHead(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))  # normalised rows e1, e2
    x = torch.tensor([[3.0, 4.0]])  # normalised (0.6, 0.8): cosines 0.6, 0.8
    torch.testing.assert_close(head(x), torch.tensor([[38.4, 51.2]]))  # 64 * cos: evaluation
    torch.testing.assert_close(head(x, torch.tensor([1])), torch.tensor([[38.4, 28.8]]))  # 64 * (0.8 - 0.35)
    torch.testing.assert_close(head(x, torch.tensor([0])), torch.tensor([[16.0, 51.2]]))  # 64 * (0.6 - 0.35)


def test_drop_is_measured_from_the_model_at_the_start_of_the_request():
    """Reference :920: forget_acc_before is evaluated after loading the previous request's model."""
    class H:  # groups: request 0, request 1, never forgotten
        acc_matrix = [[10.0, 80.0, 90.0], [0.0, 20.0, 85.0]]
        test_counts = [10, 10, 20]
        initial_accuracy = [100.0, 90.0, 95.0]
    m = from_history(H)
    r0, r1 = m["per_request"]
    assert r0["acc_forget_before"] == 100.0 and r0["drop"] == 90.0
    assert r1["acc_forget_before"] == 80.0 and r1["drop"] == 60.0  # 80 after request 0, not the original 90
    assert r1["acc_forget_original"] == 90.0 and r1["acc_retain_before"] == 90.0
    assert m["h_mean"] == pytest.approx(2 * 60 * 85 / 145)


def test_synthetic_forget_cosface_head_trains_and_gs_lora_uses_its_margin(tmp_path):
    from cl.app.testbeds.synthetic_forget import build_source

    cfg = {"synthetic": {"n_classes": 4, "train_per_class": 8, "test_per_class": 2}, "epochs": 1,
           "vit": {"embed_dim": 32, "depth": 1, "num_heads": 2}, "head": "cosface", "cache_dir": str(tmp_path)}
    bb = build_source(cfg)
    assert isinstance(bb.head, CosFaceHead) and bb.head.s == 64.0 and bb.head.m == 0.35
    assert build_source(cfg).weights_id == bb.weights_id  # cached under its own key
    assert build_source({**cfg, "head": "linear"}).weights_id != bb.weights_id
    with pytest.raises(Exception, match="cosface"):
        build_source({**cfg, "head": "arcface"})
    assert np.isfinite(float(bb.head(bb(torch.rand(2, 3, 32, 32))).sum()))

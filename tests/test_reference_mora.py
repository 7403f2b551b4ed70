"""MoRA (MoRAM) against a re-statement of the reference step (Artificer-AI-Lab/MoRAM, XTAIL/, read at its stored
HEAD), on the same tiny CLIP (configs/backbone/clip-tiny.yaml, random weights), batch and experts.

Re-stated here without the strategy's helpers:
- the layer, XTAIL/loralib/moram.py:113-158: result = F.linear(x, W, b); A = cat[old_A, A], B = cat[old_B, B * 1];
  z = x A^T; s = normalize(z); k = max(topk, 2); top-k of s scattered into -inf; w = softmax(masked / temp);
  not training: w *= (s >= threshold); result + (z * w) B^T;
- the loss, XTAIL/models/moram.py:710-796: seen-class prompt embeddings encoded once at the task start without
  gradient, the current ones every step; logits = exp(logit_scale) * img @ [seen, cur]^T with the seen columns
  at -inf, CE with labels + |seen| (label smoothing 0, main.py:64); t_logits = exp(logit_scale) * [seen, cur] @ img^T,
  CE with the same-class mask as soft targets (rows of seen classes all-zero); loss = CE_i + CE_t;
- evaluation, XTAIL/main.py:213-270: exp(logit_scale) * normalize(img) @ normalize(all prompts)^T.
The attention rewrite (open_clip's fused MHA as q/k/v/out Linears) is the model on both sides; its equality with
nn.MultiheadAttention is tests/test_mora.py's.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.engine.strategy import Batch
from strategies.mora import RankOneExperts

pytestmark = pytest.mark.unit


class RefMoRAM(nn.Module):
    def __init__(self, layer: RankOneExperts):
        super().__init__()
        self.weight = layer.base.weight.detach().clone()
        self.bias = None if layer.base.bias is None else layer.base.bias.detach().clone()
        self.old_lora_A = layer.old_A.detach().clone() if layer.old_A.shape[0] else None
        self.old_lora_B = layer.old_B.detach().clone() if layer.old_A.shape[0] else None
        self.lora_A = nn.Parameter(layer.A.detach().clone())
        self.lora_B = nn.Parameter(layer.B.detach().clone())
        self.topk, self.temp, self.lora_threshold = layer.topk, layer.temperature, layer.threshold

    def forward(self, x):
        result = F.linear(x, self.weight, bias=self.bias)
        if self.old_lora_A is not None:
            A = torch.cat([self.old_lora_A, self.lora_A], dim=0)
            B = torch.cat([self.old_lora_B, self.lora_B * 1.0], dim=1)
        else:
            A, B = self.lora_A, self.lora_B * 1.0
        projection = x @ A.T
        normed = F.normalize(projection, p=2, dim=-1)
        k = max(self.topk, 2)
        vals, idx = torch.topk(normed, k=k, dim=-1)
        masked = torch.full_like(normed, float("-inf"))
        masked.scatter_(-1, idx, vals)
        weights = F.softmax(masked / self.temp, dim=-1)
        if not self.training and self.lora_threshold > 0:
            weights = weights * (normed >= self.lora_threshold).float()
        return result + torch.matmul(projection * weights, B.T)


def _swap(model):
    layers = []
    for _, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, RankOneExperts):
                ref = RefMoRAM(child)
                setattr(m, cname, ref)
                layers.append(ref)
    return layers


def _setup(compose, topk):
    import scenarios
    import strategies
    from cl.models.backbones import build

    cfg = compose("strategy=mora", "scenario=synthetic-xtail", "backbone=clip-tiny", "scenario.limit_per_class=4",
                  "strategy.rank=4", f"strategy.topk={topk}")
    stream = scenarios.build(cfg["scenario"])
    torch.manual_seed(0)
    return stream, strategies.build(cfg["strategy"], build(cfg["backbone"]), stream.info)


def _data(exp):
    x = torch.stack([exp.train[i][0] for i in range(len(exp.train))]).float() / 255
    return x, torch.as_tensor(exp.train.targets)


def _compare(compose, topk):
    stream, s = _setup(compose, topk)
    # task 0: one step so that task 1 has trained, frozen old experts
    s.observe_classes(stream[0])
    opt = torch.optim.AdamW(s.begin_experience(stream[0]), lr=1e-2)
    s.train()
    x0, y0 = _data(stream[0])
    with torch.no_grad():
        for layer in s.experts:
            layer.B.normal_(0, 0.02)  # B starts at zero: give the old experts a non-trivial value
    loss = s.train_step(Batch(x0, y0))
    opt.zero_grad()
    loss.backward()
    opt.step()
    s.end_experience(stream[0], None)

    s.observe_classes(stream[1])
    params = s.begin_experience(stream[1])
    ref = copy.deepcopy(s.backbone)
    ref_layers = _swap(ref)
    assert len(ref_layers) == len(s.experts)
    ref_params = [p for r in ref_layers for p in (r.lora_A, r.lora_B)]
    prompts = s.prompts
    seen = [prompts[c] for c in stream.info.classes_per_experience[0]]
    cur = [prompts[c] for c in stream.info.classes_per_experience[1]]
    n_seen = len(seen)
    first_cur = min(stream.info.classes_per_experience[1])
    ref.train()
    with torch.no_grad():
        seen_emb = F.normalize(ref.encode_text(seen).float(), dim=-1)

    def ref_loss(x, y):
        cur_emb = F.normalize(ref.encode_text(cur).float(), dim=-1)
        emb = torch.cat([seen_emb, cur_emb])
        out = F.normalize(ref(x).float(), dim=-1)
        scale = ref.logit_scale.float()  # the wrapper's logit_scale is already exp(clip.logit_scale)
        logits = scale * out @ emb.T
        logits[:, :n_seen] = float("-inf")
        labels = y - first_cur + n_seen
        ce = F.cross_entropy(logits, labels)
        mask = torch.eq(labels.view(-1, 1), torch.arange(emb.shape[0]).view(-1, 1).T).float().t()
        ce_t = F.cross_entropy(scale * emb @ out.t(), mask)
        return ce + ce_t

    # The reference's AdamW (betas (0.9, 0.9999), wd 0) but eps 1e-4 instead of 1e-8: the two sides sum in
    # different float orders and at eps 1e-8 Adam blows the ~1e-9 gradient noise of a few near-zero entries up to
    # lr-sized steps (4 of 1024 entries off by 5e-5 after 3 steps); loss and gradients agree to 1e-5 either way.
    opt_s = torch.optim.AdamW(params, lr=5e-3, weight_decay=0.0, betas=(0.9, 0.9999), eps=1e-4)
    opt_r = torch.optim.AdamW(ref_params, lr=5e-3, weight_decay=0.0, betas=(0.9, 0.9999), eps=1e-4)
    x, y = _data(stream[1])
    s.train()
    for k in range(3):
        loss_s = s.train_step(Batch(x, y))
        loss_r = ref_loss(x, y)
        torch.testing.assert_close(loss_s, loss_r, atol=1e-5, rtol=1e-5)
        opt_s.zero_grad()
        opt_r.zero_grad()
        loss_s.backward()
        loss_r.backward()
        if k == 0:
            for a, b in zip(params, ref_params):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
        opt_s.step()
        opt_r.step()
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-4)
    s.eval()
    ref.eval()
    xt = torch.stack([stream[2].test[i][0] for i in range(len(stream[2].test))]).float() / 255
    with torch.no_grad():
        all_emb = F.normalize(ref.encode_text(prompts).float(), dim=-1)
        expect = ref.logit_scale.float() * F.normalize(ref(xt).float(), dim=-1) @ all_emb.T
        torch.testing.assert_close(s.predict(xt), expect, atol=1e-4, rtol=1e-4)


def test_step_matches_the_reference_with_a_sparse_top_k(compose):
    _compare(compose, topk=3)  # k = 3 of R = 8 experts: the top-k scatter path


def test_layer_with_top_k_equal_to_all_experts_matches_the_reference():
    """k = R: the strategy's dense-softmax shortcut must equal the reference's top-k + scatter, train and eval."""
    torch.manual_seed(0)
    layer = RankOneExperts(nn.Linear(8, 5), topk=8, temperature=0.01, threshold=0.2)
    layer.add_task(4)
    with torch.no_grad():
        layer.B.normal_()
    layer.add_task(4)
    with torch.no_grad():
        layer.B.normal_()
    ref = RefMoRAM(layer)
    x = torch.randn(3, 7, 8)
    for mode in (True, False):
        layer.train(mode)
        ref.train(mode)
        torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)

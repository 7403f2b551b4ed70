"""MOS against its reference code, step by step (issue 18: "faithful" = numerically equal).

`RefMOS` below is an independent, minimal re-statement of what sun-hailong/AAAI25-MOS@8d5e07c computes, written
from reading it (file:line cited at each step) on plain tensors: the tiny ViT's frozen weights are read once from
the backbone's state dict and run by our own functional forward (no timm module, no clbench PEFT code, no MOS
helper). The strategy and the re-statement start from the same weights and see the same batches and the same
dropout masks (same seed per forward; the adapters' dropout is the only random op in a forward), then three
experiences are run through both:

  training (a few SGD steps per experience): the loss (CE with old logits -inf + reg * orthogonality loss),
  the gradients of every trained parameter after each step, the parameters after each step, i.e. after the
  optimiser step and the 13 pulls per step (depth = 4 here: 4 in the forward, one before each block, + 1 merge);
  end of experience: the stored set and prefix sums, the class statistics (class by class, batches of 3 x bs,
  the current set pulled before every block of every batch), the prototypes under adapter set 0 (with its
  dropout active from the second task on, as the reference's train-mode `replace_fc`);
  evaluation through `Trainer.evaluate`: the batch size (the training one), each batch's scores (prototype
  logits, features under every set with the test-time pulls, self-refined retrieval, the ensemble), the stored
  sets after the test-time pulls, the predictions.

Classifier alignment is run with `crct_epochs=0` here (its pseudo-features come from another random stream than
the reference's MultivariateNormal draws); `test_classifier_alignment_matches_the_reference_given_the_same_draws`
checks it on the strategy's own draws.

The gradient test fails on the old in-place pull (`p.data.mul_(..).add_(..)`, before issue 18): there, backward
through every block but the last used weights pulled after the forward ran.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.data import to_model_input
from cl.engine.stream import eval_view
from cl.engine.strategy import Batch
from cl.engine.trainer import Trainer, TrainerConfig, normalize_groups

pytestmark = pytest.mark.e2e

BS = 4           # training batch size: stats batches of 12 (a class has 16 images: 2 batches), test batches of 4
STEPS = 3        # SGD steps per experience
EXPERIENCES = 3  # set 2 is pulled toward the mean of sets 0 and 1
LR, MOMENTUM, WD = 0.05, 0.9, 5e-4
ATOL = RTOL = 1e-5


# ----------------------------------------------------------------------------------------------------------
# The re-statement of the reference (AAAI25-MOS backbone/vit_mos.py, models/mos.py, utils/inc_net.py)
# ----------------------------------------------------------------------------------------------------------
class RefMOS:
    """Plain-tensor MOS. Adapter sets are lists (one per block) of dicts {dw, db, uw, ub}."""

    def __init__(self, vit_state: dict, cur: list[dict], head_w, head_b, n_classes: int, depth: int, heads: int,
                 patch: int, momentum=0.1, reg=0.1, scale=0.1, dropout=0.1):
        self.w = {k: v.detach().clone() for k, v in vit_state.items()}
        self.cur = [{k: v.detach().clone() for k, v in layer.items()} for layer in cur]
        self.head_w, self.head_b = head_w.detach().clone(), head_b.detach().clone()
        self.depth, self.heads, self.patch = depth, heads, patch
        self.m, self.reg, self.scale, self.p_drop = momentum, reg, scale, dropout
        self.adapter_list: list[list[dict]] = []
        self.sums: list[list[dict]] = []  # sums[k][layer]: prefix sum of sets 0..k (vit_mos.py:315-326)
        self.fc = torch.zeros(n_classes, head_w.shape[1])
        self.cls_mean: dict[int, torch.Tensor] = {}
        self.cls_cov: dict[int, torch.Tensor] = {}
        self.cls2task: dict[int, int] = {}
        self.cur_task, self.known, self.total = -1, 0, 0
        self.buf: dict = {}

    # vit_mos.py:328-346 `reweight_adapter`: every block's adapter of the set, a new tensor (`.data = ...`),
    # (1 - m) * w + m * sum[idx-1] / idx, evaluated left to right as Python does: (m * sum) / idx.
    def reweight(self, adapter: list[dict], idx: int) -> None:
        if self.m == 0 or idx == 0:
            return
        for layer, s in zip(adapter, self.sums[idx - 1]):
            for k in layer:
                layer[k] = (1 - self.m) * layer[k] + self.m * s[k] / idx

    def adapter(self, a: dict, x, training: bool):  # vit_mos.py:70-90 (no LayerNorm, scale 0.1, add_residual=False)
        down = F.relu(F.linear(x, a["dw"], a["db"]))
        down = F.dropout(down, p=self.p_drop, training=training)
        return F.linear(down, a["uw"], a["ub"]) * self.scale

    def attention(self, j: int, x):  # vit_mos.py:112-134, q/k/v = the rows of the fused qkv (vit_mos.py:424-440)
        w = self.w
        B, N, C = x.shape
        h = self.heads
        qkv = F.linear(x, w[f"blocks.{j}.attn.qkv.weight"], w[f"blocks.{j}.attn.qkv.bias"])
        q, k, v = (t.reshape(B, N, h, C // h).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = torch.softmax(q @ k.transpose(-2, -1) * (C // h) ** -0.5, dim=-1)
        out = (att @ v).transpose(1, 2).reshape(B, N, C)
        return F.linear(out, w[f"blocks.{j}.attn.proj.weight"], w[f"blocks.{j}.attn.proj.bias"])

    def block(self, j: int, x, a: dict | None, training: bool):  # vit_mos.py:155-178, ffn_option parallel
        w, C = self.w, x.shape[-1]
        x = x + self.attention(j, F.layer_norm(x, (C,), w[f"blocks.{j}.norm1.weight"], w[f"blocks.{j}.norm1.bias"],
                                               1e-6))
        adapt_x = self.adapter(a, x, training) if a is not None else None
        residual = x
        hdn = F.layer_norm(x, (C,), w[f"blocks.{j}.norm2.weight"], w[f"blocks.{j}.norm2.bias"], 1e-6)
        hdn = F.gelu(F.linear(hdn, w[f"blocks.{j}.mlp.fc1.weight"], w[f"blocks.{j}.mlp.fc1.bias"]))
        x2 = F.linear(hdn, w[f"blocks.{j}.mlp.fc2.weight"], w[f"blocks.{j}.mlp.fc2.bias"])
        if adapt_x is not None:
            x2 = x2 + adapt_x
        return residual + x2

    def forward_features(self, x, adapter_id: int, train: bool, training: bool, leaves: list | None = None):
        """vit_mos.py:348-393. train=True: the current set, re-weighted before every block; train=False: set
        `adapter_id` (the stored one, or the current set when adapter_id == len(adapter_list)), likewise.
        `leaves` (training): the tensors each block used, as autograd leaves, so that their gradients are what
        the reference's backward accumulates into the parameters (the pulls are `.data` writes, not traced)."""
        w = self.w
        x = F.conv2d(x, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=self.patch)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([w["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + w["pos_embed"]
        for j in range(self.depth):
            if train or adapter_id == len(self.adapter_list):
                adapter = self.cur
            else:
                adapter = self.adapter_list[adapter_id]
            self.reweight(adapter, adapter_id)
            a = adapter[j]
            if leaves is not None:
                a = {k: v.detach().requires_grad_(True) for k, v in a.items()}
                leaves.append(a)
            x = self.block(j, x, a, training)
        x = F.layer_norm(x, (x.shape[-1],), w["norm.weight"], w["norm.bias"], 1e-6)
        return x[:, 0]

    def head(self, f):
        return F.linear(f, self.head_w, self.head_b)

    def orth_loss(self, features):  # models/mos.py:335-354
        if self.cls_mean:
            m = torch.cat([torch.stack(list(self.cls_mean.values())), features])
        else:
            m = features
        sim = m @ m.t() / 0.8
        return self.reg * F.cross_entropy(sim, torch.arange(sim.shape[0]))

    # models/mos.py:77-86: a new task
    def begin_task(self, n_new: int):
        self.cur_task += 1
        self.total = self.known + n_new
        for c in range(self.known, self.total):
            self.cls2task[c] = self.cur_task
        self.buf = {}  # models/mos.py:108: a new optimiser per task

    # models/mos.py:159-175: one step (forward, loss, backward, SGD step, adapter_merge)
    def train_step(self, x, y):
        leaves: list[dict] = []
        head_w = self.head_w.detach().requires_grad_(True)
        head_b = self.head_b.detach().requires_grad_(True)
        feats = self.forward_features(x, self.cur_task, train=True, training=True, leaves=leaves)
        logits = F.linear(feats, head_w, head_b)[:, : self.total].clone()
        logits[:, : self.known] = float("-inf")
        loss = F.cross_entropy(logits, y) + self.orth_loss(feats)
        loss.backward()
        grads = {"head_w": head_w.grad, "head_b": head_b.grad,
                 "adapters": [{k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in a.items()}
                              for a in leaves]}
        # torch.optim.SGD (models/mos.py:118-140): adapters at lr, the head at 0.1 lr, both with weight decay;
        # the parameters hold the values after the forward's pulls.
        for key, p, g, lr in self._params(grads):
            d = g + WD * p
            buf = self.buf.get(key)
            buf = d.clone() if buf is None else buf * MOMENTUM + d
            self.buf[key] = buf
            self._set(key, p - lr * buf)
        self.reweight(self.cur, len(self.adapter_list))  # adapter_merge, vit_mos.py:303-308
        return loss.detach(), grads

    def _params(self, grads):
        for j, layer in enumerate(self.cur):
            for k in layer:
                yield (j, k), layer[k], grads["adapters"][j][k], LR
        yield "head_w", self.head_w, grads["head_w"], 0.1 * LR
        yield "head_b", self.head_b, grads["head_b"], 0.1 * LR

    def _set(self, key, value):
        if key == "head_w":
            self.head_w = value.detach()
        elif key == "head_b":
            self.head_b = value.detach()
        else:
            self.cur[key[0]][key[1]] = value.detach()

    # models/mos.py:111-116 then :101 (adapter_update, _compute_mean, [classifier alignment], replace_fc)
    @torch.no_grad()
    def end_task(self, images_per_class: dict[int, torch.Tensor], bs: int):
        self.adapter_list.append(copy.deepcopy(self.cur))  # vit_mos.py:310-312
        prev = self.sums[-1] if self.sums else None
        self.sums.append([{k: (layer[k] + prev[j][k]) if prev else layer[k].clone() for k in layer}
                          for j, layer in enumerate(self.cur)])
        for c in range(self.known, self.total):  # models/mos.py:199-222: per class, batches of 3 * bs
            imgs = images_per_class[c]
            vecs = torch.cat([self.forward_features(imgs[i: i + 3 * bs], self.cur_task, train=True, training=False)
                              for i in range(0, len(imgs), 3 * bs)])
            self.cls_mean[c] = vecs.mean(0)
            self.cls_cov[c] = torch.cov(vecs.T) + torch.eye(vecs.shape[1]) * 1e-4
    @torch.no_grad()
    def replace_fc(self, images, labels, batch_size: int):
        """models/mos.py:51-72 (forward_orig = set 0, inc_net.py:135-142), called at :101 after `_train`, whose
        `classifer_align` (t > 0 only) left the backbone in train mode (:248): from the second task on, set 0's
        adapter dropout is active here. (The reference draws its batches from a shuffled loader; the same batches
        as the strategy's here, so that the dropout masks are the same.)"""
        feats = []
        for b, i in enumerate(range(0, len(images), batch_size)):
            torch.manual_seed(1000 * self.cur_task + b)
            feats.append(self.forward_features(images[i: i + batch_size], 0, train=False, training=self.cur_task > 0))
        feats = torch.cat(feats)
        for c in range(self.known, self.total):
            self.fc[c] = feats[labels == c].mean(0)

    def after_task(self):
        self.known = self.total

    # models/mos.py:357-411: one test batch
    @torch.no_grad()
    def eval_batch(self, x):
        T = self.cur_task
        f0 = self.forward_features(x, 0, train=False, training=False)
        orig = (F.normalize(f0, dim=1) @ F.normalize(self.fc, dim=1).t())[:, : self.total]  # sigma = 1
        orig_idx = [self.cls2task[int(v)] for v in orig.argmax(1)]
        all_features = torch.stack([self.forward_features(x, t, train=False, training=False)
                                    for t in range(T + 1)], dim=1)
        final = []
        for i in range(len(x)):
            loop, prev = 0, orig_idx[i]
            while True:
                loop += 1
                cur_logits = self.head(all_features[i, prev][None])[:, : self.total]
                cur = self.cls2task[int(cur_logits.argmax(1))]
                if loop >= 4 or cur == prev:
                    break
                prev = cur
            final.append(cur_logits)
        final = torch.cat(final)
        return F.softmax(final, dim=1) + F.softmax(orig / (1 / (T + 1)), dim=1)


# ----------------------------------------------------------------------------------------------------------
# Running both
# ----------------------------------------------------------------------------------------------------------
def flat_set(adapters) -> list[dict]:
    """The strategy's adapter set (peft.Adapter per block) as the re-statement's dicts."""
    return [{"dw": a.down.weight, "db": a.down.bias, "uw": a.up.weight, "ub": a.up.bias} for a in adapters]


def max_rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def close(a, b) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


@pytest.fixture(scope="module")
def both():
    """Three experiences through the strategy and the re-statement; every compared quantity, recorded."""
    torch.set_num_threads(1)
    cfg = compose_config(["strategy=mos", "scenario=synthetic", "scenario.shuffle=false", "debug=fast",
                          "trainer.device=cpu", "trainer.progress=false", "trainer.precision=fp32",
                          f"trainer.batch_size={BS}", f"trainer.lr={LR}", f"trainer.momentum={MOMENTUM}",
                          f"trainer.weight_decay={WD}", "strategy.crct_epochs=0"])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    mos = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    trainer = Trainer(TrainerConfig.from_mapping(cfg["trainer"]))
    with torch.no_grad():  # a non-zero start (up-projections are zero-initialised): every block's adapter matters
        for a in mos.cur_adapter:
            a.up.weight.normal_(0, 0.2)
            a.up.bias.normal_(0, 0.02)
    vit = mos.backbone.model
    depth = len(vit.blocks)
    frozen = {k: v for k, v in vit.state_dict().items() if "adapter" not in k}
    ref = RefMOS(frozen, flat_set(mos.cur_adapter), mos.head.weight, mos.head.bias, stream.info.n_classes, depth,
                 heads=vit.blocks[0].attn.num_heads, patch=vit.patch_embed.proj.stride[0])
    size, chans = mos.backbone.input_size, mos.backbone.in_chans
    rec = {"loss": [], "grad": [], "param": [], "mean": [], "cov": [], "proto": [], "stored": [], "eval_bs": [],
           "scores": [], "pred": [], "sets_after_eval": [], "n_batches": []}
    for t in range(EXPERIENCES):
        exp = stream[t]
        assert list(exp.classes) == list(range(2 * t, 2 * t + 2))  # shuffle=false: global id = reference label
        mos.observe_classes(exp)
        groups = normalize_groups(mos.begin_experience(exp))
        opt = trainer._make_optimizer(mos, groups)
        ref.begin_task(len(exp.classes))
        if t > 0:  # as if trained longer: the current set far from the stored mean, so that every pull matters
            with torch.no_grad():
                g = torch.Generator().manual_seed(10 + t)
                for a, r in zip(flat_set(mos.cur_adapter), ref.cur):
                    for k in a:
                        a[k].add_(0.1 * torch.randn(a[k].shape, generator=g))
                        r[k] = a[k].detach().clone()
        order = torch.randperm(len(exp.train), generator=torch.Generator().manual_seed(t))
        mos.train()
        for s in range(STEPS):
            idx = order[s * BS:(s + 1) * BS].tolist()
            x = to_model_input(torch.stack([torch.as_tensor(exp.train[i][0]) for i in idx]), size, chans, "cpu")
            y = torch.tensor([int(exp.train[i][1]) for i in idx])
            torch.manual_seed(100 * t + s)
            loss = mos.train_step(Batch(x, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            got_grad = [{k: (v.grad.clone() if v.grad is not None else torch.zeros_like(v)) for k, v in a.items()}
                        for a in flat_set(mos.cur_adapter)]
            got_head = (mos.head.weight.grad.clone(), mos.head.bias.grad.clone())
            opt.step()
            mos.after_optimizer_step()
            torch.manual_seed(100 * t + s)
            ref_loss, ref_grads = ref.train_step(x, y)
            rec["loss"].append((t, s, loss.item(), ref_loss.item()))
            rec["grad"].append((t, s, got_grad, got_head, ref_grads))
            rec["param"].append((t, s, [{k: v.detach().clone() for k, v in a.items()} for a in flat_set(mos.cur_adapter)],
                                 (mos.head.weight.detach().clone(), mos.head.bias.detach().clone()),
                                 copy.deepcopy(ref.cur), (ref.head_w.clone(), ref.head_b.clone())))
        mos.eval()
        loader = type("L", (), {"batch_size": BS})()  # end_experience reads the training batch size from it
        # The prototype pass's dropout masks (t > 0): each of its batches seeded, here and in the re-statement.
        features, seeded_batches = mos.features, []

        def seeded(x, k=None, pulling=False):
            if k == 0 and mos.adapter_list[0].training:
                torch.manual_seed(1000 * t + len(seeded_batches))
                seeded_batches.append(len(x))
            return features(x, k=k, pulling=pulling)

        mos.features = seeded
        try:
            mos.end_experience(exp, loader)
        finally:
            del mos.features
        assert bool(seeded_batches) == (t > 0)
        view = eval_view(exp.train)
        per_class = {}
        for c in exp.classes:
            ids = np.flatnonzero(np.asarray(exp.train.targets) == c)
            per_class[c] = to_model_input(torch.stack([torch.as_tensor(view[int(i)][0]) for i in ids]), size, chans,
                                          "cpu")
        ref.end_task(per_class, BS)
        all_x = to_model_input(torch.stack([torch.as_tensor(view[i][0]) for i in range(len(view))]), size, chans, "cpu")
        ref.replace_fc(all_x, torch.as_tensor(np.asarray(exp.train.targets)), mos.h["eval_batch_size"])
        for c in exp.classes:
            rec["mean"].append((t, c, mos.cls_mean[c].clone(), ref.cls_mean[c]))
            rec["cov"].append((t, c, mos.cls_cov[c].clone(), ref.cls_cov[c]))
            rec["proto"].append((t, c, mos.proto_head.weight[c].clone(), ref.fc[c]))
        rec["stored"].append((t, [{k: v.clone() for k, v in a.items()} for a in flat_set(mos.adapter_list[t])],
                              copy.deepcopy(ref.adapter_list[t]),
                              [{k: v.clone() for k, v in a.items()} for a in flat_set(mos.cur_adapter)],
                              copy.deepcopy(ref.cur)))
        ref.after_task()

        # Evaluation through the trainer (its batch size, its order: the seen experiences' test sets in turn).
        rec["eval_bs"].append(trainer._eval_batch_size(mos))
        scores, batches = [], []
        predict = mos.predict

        def recording(x, task_id=None):
            out = predict(x, task_id)
            scores.append(out.clone())
            batches.append(x.clone())
            return out

        mos.predict = recording
        try:
            trainer.evaluate(stream, mos, upto=t)
        finally:
            del mos.predict
        ref_scores = [ref.eval_batch(x) for x in batches]
        rec["n_batches"].append((t, [len(x) for x in batches], sum(len(stream[j].test) for j in range(t + 1))))
        for got, want in zip(scores, ref_scores):
            rec["scores"].append((t, got[:, : ref.total], want))
            rec["pred"].append((t, got.argmax(1), want.argmax(1)))
        rec["sets_after_eval"].append((t, [[{k: v.clone() for k, v in a.items()} for a in flat_set(s)]
                                           for s in mos.adapter_list], copy.deepcopy(ref.adapter_list)))
    return rec


def assert_sets_close(got: list[dict], want: list[dict], what: str):
    for j, (g, w) in enumerate(zip(got, want)):
        for k in g:
            assert close(g[k], w[k]), f"{what}: block {j} {k}: max rel diff {max_rel(g[k], w[k]):.2e}"


# ----------------------------------------------------------------------------------------------------------
# The comparisons
# ----------------------------------------------------------------------------------------------------------
def test_training_loss_matches_the_reference(both):
    """CE over the current classes (old logits -inf) + 0.1 * orthogonality loss against the stored means."""
    for t, s, got, want in both["loss"]:
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL), f"experience {t} step {s}: {got} vs {want}"


def test_gradients_match_the_reference_after_each_step(both):
    """The gradients of every trained parameter. Fails with an in-place pull: backward through block j would
    use the weights pulled `depth` times instead of j + 1 times (all blocks but the last, experiences >= 1)."""
    for t, s, got, got_head, ref in both["grad"]:
        assert_sets_close(got, ref["adapters"], f"experience {t} step {s} adapter gradients")
        assert close(got_head[0], ref["head_w"]) and close(got_head[1], ref["head_b"]), f"head grad, exp {t} step {s}"
    # not vacuous: the first block's adapter gets gradients well above the tolerance
    assert all(g[0]["dw"].abs().max() > 1e-3 for t, s, g, _, _ in both["grad"] if t >= 1)


def test_parameters_match_the_reference_after_each_step_and_its_pulls(both):
    """After each SGD step and the 13 (here depth + 1 = 5) pulls of a step, and after several steps."""
    for t, s, got, got_head, want, want_head in both["param"]:
        assert_sets_close(got, want, f"experience {t} step {s} adapters")
        assert close(got_head[0], want_head[0]) and close(got_head[1], want_head[1]), f"head, exp {t} step {s}"


def test_stored_sets_class_statistics_and_prototypes_match_the_reference(both):
    for t, got, want, got_cur, want_cur in both["stored"]:
        assert_sets_close(got, want, f"stored set {t}")
        assert_sets_close(got_cur, want_cur, f"current set after the statistics pass of experience {t}")
    for t, c, got, want in both["mean"]:
        assert close(got, want), f"class {c} mean: {max_rel(got, want):.2e}"
    for t, c, got, want in both["cov"]:
        assert close(got, want), f"class {c} covariance: {max_rel(got, want):.2e}"
    for t, c, got, want in both["proto"]:
        assert close(got, want), f"class {c} prototype (set 0): {max_rel(got, want):.2e}"


def test_evaluation_uses_the_training_batch_size_and_the_same_batches(both):
    assert both["eval_bs"] == [BS] * EXPERIENCES  # trainer.eval_batch_size is 128 in this config
    for t, sizes, n in both["n_batches"]:
        assert sum(sizes) == n and max(sizes) == BS and len(sizes) == -(-n // BS)


def test_scores_predictions_and_test_time_pulls_match_the_reference(both):
    """Per test batch: the ensemble softmax(refined) + softmax((T+1) * prototype logits), the self-refined
    retrieval over every set's features, and the stored sets rewritten by the test-time pulls."""
    for t, got, want in both["scores"]:
        assert close(got, want), f"experience {t} scores: max abs diff {(got - want).abs().max():.2e}"
    for t, got, want in both["pred"]:
        assert torch.equal(got, want), f"experience {t} predictions"
    for t, got_sets, want_sets in both["sets_after_eval"]:
        for k, (g, w) in enumerate(zip(got_sets, want_sets)):
            assert_sets_close(g, w, f"set {k} after the evaluation of experience {t}")
    # not vacuous: the test-time pulls did move a stored set k >= 1
    t, got_sets, _ = both["sets_after_eval"][-1]
    stored = both["stored"][1][1]
    assert not torch.equal(got_sets[1][0]["dw"], stored[0]["dw"])


# ----------------------------------------------------------------------------------------------------------
# Classifier alignment, on the strategy's own random draws
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_classifier_alignment_matches_the_reference_given_the_same_draws(monkeypatch):
    """models/mos.py:247-333: per epoch, 5 x bs samples of N(mu_c, Sigma_c) per seen class, shuffled, one SGD
    step (ca_lr, momentum 0.9, the task's weight decay, cosine over the epochs) per class-sized chunk, CE over
    the seen classes. The reference samples with MultivariateNormal (mean + L eps, L = cholesky(Sigma)); the
    strategy's eps and permutations are recorded and replayed here, so only the procedure is compared."""
    cfg = compose_config(["strategy=mos", "scenario=synthetic", "debug=fast", "trainer.device=cpu",
                          "strategy.crct_epochs=3", "strategy.ca_lr=0.05"])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    mos = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    d, seen, per_class, wd = mos.backbone.feature_dim, [0, 3, 5, 6], 8, mos.h["ca_weight_decay"]
    g = torch.Generator().manual_seed(1)
    for c in seen:
        mos.seen_mask[c] = True
        mos.cls_mean[c] = torch.randn(d, generator=g)
        a = torch.randn(d, d, generator=g) / d ** 0.5
        mos.cls_cov[c] = a @ a.T + 1e-4 * torch.eye(d)
    w0, b0 = mos.head.weight.detach().clone(), mos.head.bias.detach().clone()
    draws = []
    real_randn, real_randperm = torch.randn, torch.randperm
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(("eps", real_randn(*a, **k))) or draws[-1][1])
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: draws.append(("perm", real_randperm(*a, **k)))
                        or draws[-1][1])
    mos.align_classifier(per_class)
    monkeypatch.undo()

    w, b = w0.clone(), b0.clone()
    bufs = {}
    lr0, epochs = mos.h["ca_lr"], mos.h["crct_epochs"]
    chol = {c: torch.linalg.cholesky(mos.cls_cov[c]) for c in seen}
    for epoch in range(epochs):
        lr = 0.5 * lr0 * (1 + math.cos(math.pi * epoch / epochs))  # CosineAnnealingLR, eta_min 0
        (_, eps), (_, perm) = draws[2 * epoch], draws[2 * epoch + 1]
        data = torch.cat([mos.cls_mean[c] + eps[i] @ chol[c].T for i, c in enumerate(seen)])
        labels = torch.tensor(seen).repeat_interleave(per_class)
        data, labels = data[perm], labels[perm]
        for it in range(len(seen)):
            wl, bl = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            logits = F.linear(data[it * per_class:(it + 1) * per_class], wl, bl)
            keep = torch.zeros(w.shape[0], dtype=torch.bool)
            keep[seen] = True  # the reference slices [:, :total]: the seen classes
            loss = F.cross_entropy(logits.masked_fill(~keep, float("-inf")), labels[it * per_class:(it + 1) * per_class])
            loss.backward()
            for key, p, grad in (("w", w, wl.grad), ("b", b, bl.grad)):
                dp = grad + wd * p
                bufs[key] = dp.clone() if key not in bufs else bufs[key] * 0.9 + dp
            w, b = w - lr * bufs["w"], b - lr * bufs["b"]
    assert not torch.equal(w, w0)
    assert torch.allclose(mos.head.weight, w, atol=1e-5, rtol=1e-4)
    assert torch.allclose(mos.head.bias, b, atol=1e-5, rtol=1e-4)

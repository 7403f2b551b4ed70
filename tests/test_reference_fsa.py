"""FSA step by step against a re-statement of its reference code, aresPanos/fsa@e151d89 (written from reading it:
nothing here calls the strategy's helpers for what it checks):

- the first-session step: `src/methods/cil_trainer.py:180-208` (base_train: features -> Dropout(0.5) -> linear
  head over the base classes -> CrossEntropyLoss, Adam), `:33-41` (Adam over the adapted parameters and the head,
  MultiStepLR stepped once per epoch, `:159-167`); FSA-FiLM's forward `src/cnn/efficientnet.py:39-42` (film =
  gamma * x + beta per channel) placed as `FilmEfficientNet.extract_features` (stem BN, `:155-199` after each
  block's depthwise BN, head BN, each before the swish), the body frozen in eval mode (`cil_trainer.py:184-186`);
  full fine-tuning: the whole body in train mode (`:187-188`);
- the LDA head, `src/utils.py:86-90, 111-125` (torch.cov with correction 1, or 0 for one sample, + I; Cholesky;
  a [num_classes, D] mean matrix with zero rows for classes without data; cholesky_solve; bias = sum(coeff * mean))
  and its test logits `cil_trainer.py:261-270` (feat @ coeff - 0.5 * bias, argmax over every class).

Inputs are normalised as the reference's loaders do (Normalize(0.5, 0.5) here: the backbone's `inception`).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import DropPath
from torch.utils.data import TensorDataset

import scenarios
import strategies
from cl.models import backbones
from cl.models.backbones import Backbone
from cl.app.cli import compose_config
from cl.engine.data import to_model_input
from cl.engine.strategy import Batch
from cl.engine.stream import Experience, Stream, StreamInfo, eval_view
from cl.engine.trainer import Trainer, TrainerConfig, make_scheduler

pytestmark = pytest.mark.e2e

N_BASE = 10  # synthetic-fscil's base session: classes 0..9 of 20


# ---------------------------------------------------------------------------------------------------------------
# The reference, re-stated
# ---------------------------------------------------------------------------------------------------------------
def ref_swish(x):
    return x * torch.sigmoid(x)  # efficientnet_utils.py Swish / MemoryEfficientSwish: x * sigmoid(x)


def ref_film(x, gamma, beta):
    return gamma[None, :, None, None] * x + beta[None, :, None, None]  # efficientnet.py:39-42


def ref_bn(bn, x, training):
    """The module's BatchNorm alone (timm fuses BN and activation; the reference applies FiLM between them)."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training, bn.momentum, bn.eps)


def ref_features(model, x, films=None, training=False):
    """EfficientNet-B0's pooled feature as the reference computes it (efficientnet.py:337-381 and, with `films`
    [(gamma, beta)] x 18, FilmEfficientNet.extract_features + FilmMBConvBlock.forward), on timm's modules (conv
    weights, SE, BN parameters); drop-connect off (rate 0 here)."""
    x = (x - 0.5) / 0.5  # transforms.Normalize(mean=0.5, std=0.5)
    k = 0

    def bn_film_swish(bn, h):
        nonlocal k
        h = ref_bn(bn, h, training)
        if films is not None:
            h = ref_film(h, *films[k])
        k += 1
        return ref_swish(h)

    x = bn_film_swish(model.bn1, model.conv_stem(x))  # stem: conv, BN, FiLM, swish
    for block in (b for stage in model.blocks for b in stage):
        shortcut = x
        expand = hasattr(block, "conv_pwl")  # MBConv with expansion ratio 6 (timm InvertedResidual)
        h = ref_swish(ref_bn(block.bn1, block.conv_pw(x), training)) if expand else x  # expansion, BN, swish
        h = bn_film_swish(block.bn2 if expand else block.bn1, block.conv_dw(h))  # depthwise, BN, FiLM, swish
        s = h.mean((2, 3), keepdim=True)  # squeeze-excitation (efficientnet.py:180-185)
        h = torch.sigmoid(block.se.conv_expand(ref_swish(block.se.conv_reduce(s)))) * h
        h = ref_bn(block.bn3 if expand else block.bn2, (block.conv_pwl if expand else block.conv_pw)(h), training)
        x = h + shortcut if block.has_skip else h  # identity skip when stride 1 and same width
    x = bn_film_swish(model.bn2, model.conv_head(x))  # head conv, BN, FiLM, swish
    return x.mean((2, 3))  # adaptive average pool + flatten


def ref_lda(features, labels, num_classes):
    """utils.py:111-125, compute_lda_head."""
    n = features.shape[0]
    cov = torch.cov(features.t(), correction=1 if n > 1 else 0) + torch.eye(features.shape[1], dtype=features.dtype)
    chol = torch.linalg.cholesky(cov)
    means = torch.zeros(num_classes, features.shape[1], dtype=features.dtype)
    for c in torch.unique(labels):
        means[c] = features[labels == c].mean(0)
    means = means.t()
    coeff = torch.cholesky_solve(means, chol)  # [D, num_classes]
    bias = (coeff * means).sum(0)
    return coeff, bias


def ref_logits(features, coeff, bias):
    return features @ coeff - 0.5 * bias  # cil_trainer.py:268


# ---------------------------------------------------------------------------------------------------------------
# The first-session step
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def effnet():
    """A tiny EfficientNet, built once: timm's TinyNet-E (EfficientNet-B0's code and blocks, depthwise-separable
    and MBConv with squeeze-excitation, at width 0.51 and depth 0.6: 11 blocks), random weights, 32 px inputs,
    the presets' drop-connect 0.2."""
    cfg = compose_config(["backbone=efficientnet-b0"])["backbone"]
    torch.manual_seed(0)
    bb = backbones.build({**cfg, "arch": "tinynet_e", "pretrained": False, "input_size": 32,
                          "kwargs": {"drop_path_rate": 0.2}})
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters, so that FiLM's place matters
        for m in bb.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.normal_(1.0, 0.1, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    return bb


@pytest.fixture(scope="module")
def info():
    return scenarios.build(compose_config(["scenario=synthetic-fscil"])["scenario"]).info


@torch.no_grad()
def close(a, b, tol=1e-5):
    scale = max(1.0, float(b.abs().max()))
    return float((a - b).abs().max()) <= tol * scale


@pytest.mark.parametrize("adapt", ["film", "full"])
def test_first_session_steps_equal_the_reference(adapt, effnet, info):
    """FiLM in float32. Full fine-tuning in float64: its train-mode BatchNorm over 6 images whose last maps are
    1x1 amplifies float32 rounding to ~1e-4 (the same computation: 4e-13 apart in float64), and Adam turns
    rounding-level gradients into lr-sized steps. Drop-connect is off
    here: the same rule, but the reference draws its mask with torch.rand + floor and timm with bernoulli_."""
    bb = copy.deepcopy(effnet)
    for m in bb.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
    dtype = torch.float32 if adapt == "film" else torch.float64
    bb.to(dtype)
    ref_model = copy.deepcopy(bb.model)  # before FSA attaches its FiLM hooks
    fsa = strategies.build({"name": "fsa", "adapt": adapt}, bb, info)
    fsa.to(dtype)
    exp0 = Experience(0, None, None, list(range(N_BASE)), "fscil", task_id=0)
    fsa.observe_classes(exp0)
    groups = fsa.begin_experience(exp0)
    tc = TrainerConfig(optimizer="adam", lr=0.005, weight_decay=0.0, scheduler="multistep", milestones=[1, 2],
                       gamma=0.3, epochs=3, device="cpu", progress=False)
    opt = Trainer(tc)._make_optimizer(fsa, groups)
    sched = make_scheduler(opt, tc)
    fsa.train()

    # the reference's trainable state: FiLM gamma 1 / beta 0 (features.py:66-69), a head over the base classes
    films = [(nn.Parameter(torch.ones(f.dim, dtype=dtype)), nn.Parameter(torch.zeros(f.dim, dtype=dtype)))
             for f in fsa.films]
    head = nn.Linear(bb.feature_dim, N_BASE).to(dtype)
    with torch.no_grad():
        head.weight.copy_(fsa.head.weight[:N_BASE])
        head.bias.copy_(fsa.head.bias[:N_BASE])
    body = [p for pair in films for p in pair] if adapt == "film" else list(ref_model.parameters())
    ref_opt = torch.optim.Adam(body + list(head.parameters()), lr=0.005)
    ref_sched = torch.optim.lr_scheduler.MultiStepLR(ref_opt, milestones=[1, 2], gamma=0.3)
    drop = nn.Dropout(p=0.5)
    ref_model.train(adapt == "full")
    if adapt == "film":
        assert len(films) == 2 + len([b for stage in ref_model.blocks for b in stage])  # stem, blocks, head
        ref_model.requires_grad_(False)

    gen = torch.Generator().manual_seed(2)
    for epoch in range(3 if adapt == "film" else 2):  # one batch per epoch, the scheduler stepped after each
        x = torch.rand(6, 3, 32, 32, generator=gen, dtype=dtype)
        y = torch.randint(0, N_BASE, (6,), generator=gen)
        torch.manual_seed(100 + epoch)  # the same dropout mask on both sides
        loss = fsa.train_step(Batch(x, y))
        opt.zero_grad()
        loss.backward()
        torch.manual_seed(100 + epoch)
        feats = ref_features(ref_model, x, films if adapt == "film" else None, training=adapt == "full")
        ref_loss = F.cross_entropy(head(drop(feats)), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item())), epoch
        if epoch == 0:  # gradients of every trained parameter
            assert close(fsa.head.weight.grad[:N_BASE], head.weight.grad)
            assert close(fsa.head.bias.grad[:N_BASE], head.bias.grad)
            assert not fsa.head.weight.grad[N_BASE:].any()  # classes outside session 1 get no gradient
            if adapt == "film":
                for f, (g, b) in zip(fsa.films, films):
                    assert close(f.gamma.grad, g.grad) and close(f.beta.grad, b.grad)
            else:
                ours = dict(bb.model.named_parameters())
                for name, p in ref_model.named_parameters():
                    assert close(ours[name].grad, p.grad), name
        opt.step()
        sched.step()
        ref_opt.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"])
    # the parameters (and, fine-tuning the body, the BN statistics) after the steps (3 FiLM, 2 full: float64 is slow)
    assert close(fsa.head.weight[:N_BASE], head.weight) and close(fsa.head.bias[:N_BASE], head.bias)
    if adapt == "film":
        for f, (g, b) in zip(fsa.films, films):
            assert close(f.gamma, g) and close(f.beta, b)
        film_ids = {id(p) for f in fsa.films for p in f.parameters()}
        assert not any(p.grad is not None for p in bb.model.parameters() if id(p) not in film_ids)  # body frozen
    else:
        ours = dict(bb.model.named_parameters())
        for name, p in ref_model.named_parameters():
            assert close(ours[name], p), name
        ours = dict(bb.model.named_buffers())
        for name, b in ref_model.named_buffers():
            if b.is_floating_point():
                assert close(ours[name], b), name
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005 * 0.3 ** 2)


@pytest.mark.unit
def test_drop_connect_is_only_active_when_the_body_trains(effnet, info):
    """Drop-connect 0.2 (efficientnet_utils.py:483), scaled by block index / blocks (efficientnet.py:352-354) and
    applied on the identity-skip blocks only (:192-196), is sampled in full fine-tuning; FSA-FiLM keeps the body in
    eval mode (cil_trainer.py:184-186), so its forward stays deterministic."""
    blocks = [b for stage in effnet.model.blocks for b in stage]
    for i, b in enumerate(blocks):
        if b.has_skip:
            assert b.drop_path.drop_prob == pytest.approx(0.2 * i / len(blocks))
    x = torch.rand(2, 3, 32, 32)
    for adapt, stochastic in (("full", True), ("film", False)):
        fsa = strategies.build({"name": "fsa", "adapt": adapt}, copy.deepcopy(effnet), info)
        fsa.train()
        torch.manual_seed(0)
        a = fsa.backbone(x)
        torch.manual_seed(1)
        b = fsa.backbone(x)
        assert (not torch.equal(a, b)) == stochastic, adapt
        fsa.eval()
        assert torch.equal(fsa.backbone(x), fsa.backbone(x))


# ---------------------------------------------------------------------------------------------------------------
# The LDA head and the predictions, session by session, through the trainer
# ---------------------------------------------------------------------------------------------------------------
def features_of(bb, dataset):
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    x = to_model_input(torch.stack([torch.as_tensor(v) for v in xs]), bb.input_size, bb.in_chans, torch.device("cpu"))
    with torch.no_grad():
        return bb(x).double(), torch.as_tensor(ys)


def test_lda_head_and_predictions_equal_the_reference_every_session():
    cfg = compose_config(["strategy=fsa", "strategy.adapt=none", "scenario=synthetic-fscil", "debug=fast",
                          "trainer.progress=false", "trainer.device=cpu"])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    bb = backbones.build(cfg["backbone"])
    fsa = strategies.build(cfg["strategy"], bb, stream.info)
    n_classes = stream.info.n_classes
    checked, train_feats, test_feats = [], {}, {}

    def compare(i, strategy, history):
        bb.eval()  # adapt=none: the body never changes, so each experience's features are taken once
        train_feats[i] = features_of(bb, eval_view(stream[i].train))
        test_feats[i] = features_of(bb, stream[i].test)
        seen = [train_feats[j] for j in range(i + 1)]
        feats, labels = torch.cat([f for f, _ in seen]), torch.cat([y for _, y in seen])
        coeff, bias = ref_lda(feats, labels, n_classes)
        assert torch.allclose(strategy.lda_weight, coeff.t(), rtol=0, atol=1e-8)
        assert torch.allclose(strategy.lda_bias, bias, rtol=0, atol=1e-8)
        for j in range(i + 1):
            x = torch.stack([torch.as_tensor(stream[j].test[k][0]) for k in range(len(stream[j].test))])
            f, y = test_feats[j]
            ref = ref_logits(f, coeff, bias)
            ours = strategy.predict(to_model_input(x, bb.input_size, bb.in_chans, torch.device("cpu")))
            assert close(ours.double(), ref)  # float32 logits against the float64 reference
            if i + 1 < len(stream):
                assert (ours[:, max(max(e.classes) for e in stream[: i + 1]) + 1:] == 0).all()  # unseen: logit 0
            # the float32 reference (as it runs) gives the same predictions
            c32, b32 = ref_lda(feats.float(), labels, n_classes)
            ref32 = ref_logits(f.float(), c32, b32)
            assert close(ours, ref32, tol=1e-4)
            # the trainer's accuracy is the reference's argmax over every class
            acc = (ref.argmax(1) == y).double().mean().item() * 100
            assert history.acc_matrix[-1][j] == pytest.approx(acc)
        checked.append(i)

    Trainer(TrainerConfig.from_mapping(cfg["trainer"]), on_experience_end=compare).fit(stream, fsa)
    assert checked == list(range(len(stream)))


def flat_backbone():
    """A 'backbone' whose feature is the 2x2 one-channel input itself (4-d), so features can be chosen."""
    return Backbone(nn.Flatten(), name="flat", arch="flat", feature_dim=4, input_size=2, in_chans=1,
                    normalize="none", weights_id="flat", pretrained=False)


def test_an_unseen_class_at_logit_0_can_win_the_argmax_as_in_the_reference():
    def data(rows, labels):
        return TensorDataset(torch.tensor(rows, dtype=torch.float32).view(-1, 1, 2, 2), torch.tensor(labels))

    train0 = data([[0.9, 0.1, 0.0, 0.0], [0.8, 0.2, 0.0, 0.1], [0.1, 0.9, 0.1, 0.0], [0.0, 0.8, 0.2, 0.0]],
                  [0, 0, 1, 1])
    # the second test image of class 0 points away from both class means: both seen logits are negative (class 0's
    # the larger)
    test0 = data([[0.9, 0.1, 0.0, 0.0], [0.0, -0.9, 0.0, 0.0], [0.1, 0.9, 0.0, 0.0]], [0, 0, 1])
    train1 = data([[0.0, 0.0, 0.9, 0.1], [0.0, 0.1, 0.8, 0.0]], [2, 2])
    test1 = data([[0.0, 0.0, 0.9, 0.0]], [2])
    kinds = [[0, 1], [2]]
    exps = [Experience(0, train0, test0, kinds[0], "fscil", task_id=0),
            Experience(1, train1, test1, kinds[1], "fscil", task_id=1)]
    info = StreamInfo("flat", "fscil", 4, 2, [0, 1, 2, 3], input_shape=(1, 2, 2), classes_per_experience=kinds)
    stream = Stream(exps, info)
    rows = {}
    for unseen in ("zero", "mask"):
        fsa = strategies.build({"name": "fsa", "adapt": "none", "unseen": unseen}, flat_backbone(), info)
        history = Trainer(TrainerConfig(epochs=1, batch_size=4, device="cpu", progress=False)).fit(stream, fsa)
        rows[unseen] = history.acc_matrix
    # the reference, session 1: classes 2 and 3 (no data) score 0 and win for the second image
    f = torch.tensor([[0.9, 0.1, 0.0, 0.0], [0.8, 0.2, 0.0, 0.1], [0.1, 0.9, 0.1, 0.0], [0.0, 0.8, 0.2, 0.0]],
                     dtype=torch.float64)
    coeff, bias = ref_lda(f, torch.tensor([0, 0, 1, 1]), 4)
    pred = ref_logits(torch.tensor([[0.9, 0.1, 0, 0], [0.0, -0.9, 0, 0], [0.1, 0.9, 0, 0]], dtype=torch.float64),
                      coeff, bias).argmax(1)
    assert pred.tolist() == [0, 2, 1]
    assert rows["zero"][0][0] == pytest.approx(100 * 2 / 3)  # as the reference: the second image is lost to class 2
    masked = ref_logits(torch.tensor([[0.9, 0.1, 0, 0], [0.0, -0.9, 0, 0], [0.1, 0.9, 0, 0]], dtype=torch.float64),
                        coeff, bias)[:, :2].argmax(1)
    assert rows["mask"][0][0] == pytest.approx(100 * (masked == torch.tensor([0, 0, 1])).double().mean().item())
    assert masked.tolist() == [0, 0, 1] and rows["mask"][0][0] == pytest.approx(100.0)  # masked: class 0 wins

"""Reference-step tests for EcoTTA against a minimal re-statement written from reading Lily-Le/EcoTTA (85c1122;
the authors' Colab sample is its d72f0ce `ecotta_sample_code.py`), on the same tiny BN network, meta weights and
batches: the returned prediction, the loss (filtered entropy and the self-distilled L1 term), the gradients of the
meta networks, every parameter after each step; the warm-up's lr schedule and its parameters after two epochs.

The re-statement (`RefEcoTTA`) rebuilds the network from a copy of the untouched source model and copies of the
strategy's initial meta modules; it calls nothing in strategies/ (the synthetic-c ResNet's parts are its stages).
"""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cl.models.backbones import Backbone
from cl.engine.stream import StreamInfo
from cl.app.testbeds.synthetic_c import SmallResNet

pytestmark = pytest.mark.unit

ATOL = 1e-5


def _backbone(seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    model = SmallResNet(5, 3, (4, 8))
    with torch.no_grad():  # running statistics far from a batch's: the frozen BNs' mode shows in the numbers
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
        model.fc.weight.mul_(8)  # peaked outputs: about 2/3 of each test batch under E0 = 0.4 ln 5, the rest over
    bb = Backbone(model, name="tiny", arch="small-bn-resnet", feature_dim=5, input_size=8, in_chans=3,
                  normalize="none", weights_id="test", pretrained=True)
    bb.is_classifier = True
    return bb


def _strategy(bb, **kw):
    from strategies.ecotta import EcoTTA

    s = EcoTTA(**kw)
    s.setup(bb, StreamInfo(name="t", kind="tta", n_classes=5, n_experiences=1, class_order=list(range(5))))
    with torch.no_grad():  # non-trivial meta networks (as after a warm-up)
        g = torch.Generator().manual_seed(3)
        for p in s.net.meta_parameters():
            p.copy_(p + 0.3 * torch.randn(p.shape, generator=g))
    return s


class RefPart(nn.Module):
    """wideresnet28.py `one_part_of_networks` + `build_meta_block` + `conv_block` (= the sample code's): out =
    meta_bn(original(x)) + relu(bn(conv(x))); with cal_mseloss the input is detached first and
    btsloss = L1Loss(reduction='none')(out, original(x).detach()).mean()."""

    def __init__(self, original, meta_bn, conv, bn):
        super().__init__()
        self.original, self.meta_bn, self.conv, self.bn = original, meta_bn, conv, bn
        self.cal_mseloss, self.btsloss = False, None

    def forward(self, x):
        if self.cal_mseloss:
            x = x.detach()
        out1 = self.original(x)
        out = self.meta_bn(out1) + F.relu(self.bn(self.conv(x)))
        if self.cal_mseloss:
            self.btsloss = (out - out1.detach()).abs().mean()
        self.pair = (out, out1)
        return out


class RefEcoTTA(nn.Module):
    """ecotta_networks (wideresnet28.py): conv1/stem -> encoders (parts) -> classifier, built from the untouched
    source model and copies of the strategy's meta modules."""

    def __init__(self, source_model, strategy):
        super().__init__()
        self.stem, self.fc = source_model.stem, source_model.fc
        self.encoders = nn.ModuleList(
            RefPart(stage, copy.deepcopy(p.meta_bn), copy.deepcopy(p.conv), copy.deepcopy(p.bn))
            for stage, p in zip(source_model.stages, strategy.net.parts))
        for q in self.parameters():  # main.py:252-256: only the meta parts train
            q.requires_grad_(False)
        for e in self.encoders:
            for m in (e.meta_bn, e.conv, e.bn):
                m.requires_grad_(True)

    def meta_parameters(self):
        return [q for e in self.encoders for m in (e.meta_bn, e.conv, e.bn) for q in m.parameters()]

    def forward(self, x):
        h = self.stem(x)
        for e in self.encoders:
            h = e(h)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def configure(self, frozen_bn):
        """main.py:332 `net.train()`: every BN (original and meta) normalises with the batch; frozen_bn=source:
        the original's BNs in eval mode (source running statistics), the meta networks in train mode."""
        self.train()
        if frozen_bn == "source":
            self.stem.eval()
            for e in self.encoders:
                e.original.eval()
        return self


def _entropy_minimization(outputs, e_margin):
    """utils.py:16-34: entropies of the softmax, kept where < e_margin, mean over the kept ones."""
    ent = -(outputs.softmax(1) * outputs.log_softmax(1)).sum(1)
    return ent[torch.where(ent < e_margin)].mean(0), ent


def _batches(n=3, b=16):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(b, 3, 8, 8, generator=g) * (1 + 0.5 * k) for k in range(n)]


def _params_close(s, ref):
    got = s.net.meta_parameters()
    want = ref.meta_parameters()
    assert len(got) == len(want)
    return all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got, want))


@pytest.mark.parametrize("frozen_bn", ["batch", "source"])
def test_joint_step_matches_the_restated_objective(frozen_bn):
    """update=joint (default): ONE SGD step (lr 5e-3, momentum 0.9; main.py:282) on the paper's objective
    L = mean_{H<E0} H + λ Σ_k mean|x̃_k − sg(x_k)| (E0 = 0.4 ln C, utils.py:16-27; the L1 term of
    `one_part_of_networks` without the input detach), prediction = the logits before the step."""
    bb = _backbone()
    src = copy.deepcopy(bb.model)
    s = _strategy(bb, frozen_bn=frozen_bn, reg_weight=0.5, e0_factor=0.4)
    ref = RefEcoTTA(src, s).configure(frozen_bn)
    opt = torch.optim.SGD(ref.meta_parameters(), lr=5e-3, momentum=0.9)
    start = {k: v.clone() for k, v in s.backbone.state_dict().items()}
    for x in _batches():
        outputs = ref(x)
        loss_ent, ent = _entropy_minimization(outputs, math.log(5) * 0.4)  # NaN when no sample is kept
        assert 0 < (ent < math.log(5) * 0.4).sum() < len(x)  # the filter acts on this batch
        reg = sum((e.pair[0] - e.pair[1].detach()).abs().mean() for e in ref.encoders)
        loss = loss_ent + 0.5 * reg  # a NaN value still back-propagates zeros through the empty selection
        opt.zero_grad()
        loss.backward()
        grads = [q.grad.clone() for q in ref.meta_parameters()]
        opt.step()
        pred = s.adapt(x)
        assert torch.allclose(pred, outputs.detach(), atol=ATOL)
        assert torch.allclose(s.last_loss["entropy"], torch.nan_to_num(loss_ent.detach()), atol=ATOL)
        assert torch.allclose(s.last_loss["reg"], reg.detach(), atol=ATOL)
        assert all(torch.allclose(a.grad, b, atol=ATOL) for a, b in zip(s.net.meta_parameters(), grads))
        assert _params_close(s, ref)
    # the original network never changes (weights and running statistics)
    assert all(torch.equal(v, s.backbone.state_dict()[k]) for k, v in start.items())


def test_two_step_matches_the_community_code():
    """update=two_step, main.py:59-88: set_cal_mseloss(True); net(x); for each encoder (btsloss·λ).backward();
    step; zero_grad; set_cal_mseloss(False); outputs = net(x); entropy_minmization(outputs).backward(); step;
    the accuracy is counted on `outputs` (main.py:88)."""
    bb = _backbone()
    src = copy.deepcopy(bb.model)
    s = _strategy(bb, update="two_step", reg_weight=0.25)
    ref = RefEcoTTA(src, s).configure("batch")
    opt = torch.optim.SGD(ref.meta_parameters(), lr=5e-3, momentum=0.9)
    for x in _batches():
        opt.zero_grad()
        for e in ref.encoders:
            e.cal_mseloss = True
        ref(x)
        reg = 0.0
        for e in ref.encoders:
            (e.btsloss * 0.25).backward()
            reg += e.btsloss.detach()
        opt.step()
        opt.zero_grad()
        for e in ref.encoders:
            e.cal_mseloss = False
        outputs = ref(x)
        loss_ent, _ = _entropy_minimization(outputs, math.log(5) * 0.4)
        loss_ent.backward()  # the mean of no sample is NaN, yet its backward gives zero gradients (momentum acts)
        opt.step()
        opt.zero_grad()
        pred = s.adapt(x)
        assert torch.allclose(pred, outputs.detach(), atol=ATOL)
        assert torch.allclose(s.last_loss["entropy"], torch.nan_to_num(loss_ent.detach()), atol=ATOL)
        assert torch.allclose(s.last_loss["reg"], reg, atol=ATOL)
        assert _params_close(s, ref)


def test_entropy_filter_gives_uncertain_samples_no_gradient():
    """Samples with H >= E0 are out of the entropy loss: with λ = 0 the meta gradients equal those of the mean
    entropy over the confident samples only, and differ from the unfiltered mean's; with E0 = 0 the step moves
    nothing (no confident sample, λ = 0, fresh momentum)."""
    bb = _backbone()
    x = _batches()[0]
    s = _strategy(copy.deepcopy(bb), reg_weight=0.0, e0_factor=0.4)
    logits = s.predict(x)
    ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    keep = ent < 0.4 * math.log(5)
    assert 0 < keep.sum() < len(x), keep  # the batch has both kinds
    ref = RefEcoTTA(copy.deepcopy(bb.model), s).configure("batch")
    s.adapt(x)
    out = ref(x)
    e = -(out.softmax(1) * out.log_softmax(1)).sum(1)
    g_kept = torch.autograd.grad(e[keep].mean(), ref.meta_parameters(), retain_graph=True)
    g_all = torch.autograd.grad(e.mean(), ref.meta_parameters())
    got = [q.grad for q in s.net.meta_parameters()]
    assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got, g_kept))
    assert not all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got, g_all))

    s0 = _strategy(copy.deepcopy(bb), reg_weight=0.0, e0_factor=0.0)
    before = [q.clone() for q in s0.net.meta_parameters()]
    s0.adapt(x)
    assert all(torch.equal(a, b) for a, b in zip(before, s0.net.meta_parameters()))


def test_self_distilled_term_alone():
    """No confident sample (E0 = 0): the step is λ Σ_k mean|x̃_k − sg(x_k)| alone; its gradient reaches every
    meta network (the targets x_k are constants) and equals the re-statement's."""
    bb = _backbone()
    s = _strategy(copy.deepcopy(bb), reg_weight=0.5, e0_factor=0.0)
    ref = RefEcoTTA(copy.deepcopy(bb.model), s).configure("batch")
    x = _batches()[1]
    ref(x)
    reg = sum((e.pair[0] - e.pair[1].detach()).abs().mean() for e in ref.encoders)
    grads = torch.autograd.grad(0.5 * reg, ref.meta_parameters())
    s.adapt(x)
    got = [q.grad for q in s.net.meta_parameters()]
    assert all(torch.allclose(a, b, atol=ATOL) for a, b in zip(got, grads))
    assert all(g.abs().sum() > 0 for g in got)


class _WarmUpLR(torch.optim.lr_scheduler.LRScheduler):
    """utils.py:41-56: lr = base_lr * last_epoch / (total_iters + 1e-8), stepped after every batch."""

    def __init__(self, optimizer, total_iters):
        self.total_iters = total_iters
        super().__init__(optimizer)

    def get_lr(self):
        return [b * self.last_epoch / (self.total_iters + 1e-8) for b in self.base_lrs]


def _community_lrs(epochs, n_iters, base=0.05):
    """main.py:281-285, 309-312, 164-165: MultiStepLR([3, 6, 8], 0.2) stepped with the epoch number from epoch 2,
    WarmUpLR over the first epoch's batches (--warm 1); the lr each batch runs at."""
    import warnings

    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=base, momentum=0.9)
    train_sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6, 8], gamma=0.2)
    warm_sched = _WarmUpLR(opt, n_iters * 1)
    lrs = []
    for epoch in range(1, epochs + 1):
        if epoch > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_sched.step(epoch)
        for _ in range(n_iters):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            if epoch <= 1:
                warm_sched.step()
    return lrs


def test_warmup_lr_schedule_is_the_community_one():
    s = _strategy(_backbone())
    n = 7
    want = _community_lrs(10, n)
    got = [s.warmup_lr_at(e, i, n) for e in range(1, 11) for i in range(n)]
    assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert got[0] == 0.0 and got[n] == pytest.approx(0.05) and got[2 * n] == pytest.approx(0.01)


@pytest.mark.e2e
def test_warmup_matches_the_community_loop(monkeypatch):
    """Ten warm-up epochs (the community default, milestones 3/6/8) on a tiny source set (augmentation off on both sides): SGD lr 0.05 momentum 0.9, NO
    weight decay (main.py:281), the per-batch lr above, CE on the whole network in train mode (main.py:111, 307:
    frozen BNs on batch statistics), the same batches in the same order; the meta parameters after it agree."""
    import strategies.ecotta as ecotta
    from cl.engine.data import make_loader
    from torch.utils.data import TensorDataset

    monkeypatch.setattr(ecotta, "_warmup_augment", lambda x, gen=None: x)
    g = torch.Generator().manual_seed(5)
    data = TensorDataset((torch.rand(24, 3, 8, 8, generator=g) * 255).to(torch.uint8),
                         torch.randint(0, 5, (24,), generator=g))
    bb = _backbone()
    s = _strategy(bb, warmup_epochs=10, warmup_batch_size=16)
    ref = RefEcoTTA(copy.deepcopy(_backbone().model), s)
    opt = torch.optim.SGD(ref.meta_parameters(), lr=0.05, momentum=0.9)
    n_iters = 2  # 16 + 8
    lrs = iter(_community_lrs(10, n_iters))
    for epoch in range(10):
        ref.train()
        for x, y in make_loader(data, batch_size=16, shuffle=True, seed=epoch):
            for grp in opt.param_groups:
                grp["lr"] = next(lrs)
            loss = F.cross_entropy(ref(x.float() / 255), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    s.warm_up(data)
    assert _params_close(s, ref)


def test_bad_options_are_one_line_config_errors():
    from cl.engine.errors import ConfigError
    from strategies.ecotta import EcoTTA

    with pytest.raises(ConfigError, match="frozen_bn must be one of batch, source"):
        EcoTTA(frozen_bn="running")
    with pytest.raises(ConfigError, match="update must be joint or two_step"):
        EcoTTA(update="both")


def test_batch_statistics_cost_one_activation_per_frozen_bn():
    """frozen_bn=batch keeps each frozen BN's input for backward (a batch-statistics BN needs it even with a
    frozen affine); frozen_bn=source keeps none (affine maps). Counted with saved_tensors_hooks."""
    from strategies.tta_base import SavedForBackward

    x = _batches()[0]
    saved = {}
    for mode in ("batch", "source"):
        s = _strategy(_backbone(), frozen_bn=mode)
        with SavedForBackward(s._resident_keys()) as rec:
            s.forward_and_adapt(x)
        saved[mode] = rec.bytes
    n_frozen_bn = sum(isinstance(m, nn.BatchNorm2d) for m in _backbone().model.modules())
    assert saved["batch"] > saved["source"] and n_frozen_bn > 0, saved

"""Reference-step test for CoTTA (issue 19): an independent, minimal re-statement of qinenergy/cotta's adaptation
step, run on the same tiny BN network and batch as `strategies.cotta.CoTTA`, compared numerically.

Re-stated from qinenergy/cotta (c212a20):
- cifar/cotta.py:171-187 `configure_model`: train mode, every parameter trainable, BN without running statistics;
  cifar/cotta.py:154-162 `copy_model_and_optimizer`: model_state (the restore target), anchor and EMA deep copies;
- cifar/cotta.py:94-126 `forward_and_adapt`: student logits, anchor confidence, teacher logits, 32 teacher passes
  on `self.transform(x)`, one per view (:103-105), their mean when the confidence is below `ap` (:107-110),
  loss mean CE(teacher -> student) (:112, :129-132), Adam step, EMA (:49-52, :117), stochastic restore (:119-125),
  the teacher output returned (:126);
- imagenet/cotta.py:97-134: the same with ap 0.1, restore 0.001, the symmetric loss (:132-134) and SGD nesterov
  (imagenet/imagenetc.py setup_optimizer).
The views are the strategy's own random views (recorded), so both see the same draws; the augmentation itself is
checked against the reference's torchvision chain in tests/test_cotta_augment.py.
"""
import copy

import pytest
import torch
import torch.nn as nn

import strategies.cotta as cotta_mod
from cl.engine.stream import StreamInfo
from strategies.cotta import CoTTA
from tta_tiny import Tiny, source_model as tiny_source_model  # noqa: F401

pytestmark = pytest.mark.unit

SEED = 1234


def source_model():
    return tiny_source_model(source_statistics=True)


def info():
    return StreamInfo(name="t", kind="tta", n_classes=5, n_experiences=1, class_order=list(range(5)))


# --- the reference, re-stated -----------------------------------------------------------------------------
def ref_configure(model):
    model.train()
    model.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


class RefCoTTA:
    def __init__(self, model, optimizer, mt, rst, ap, symmetric):
        self.model, self.optimizer, self.mt, self.rst, self.ap, self.symmetric = model, optimizer, mt, rst, ap, symmetric
        self.model_state = copy.deepcopy(model.state_dict())
        self.model_anchor = copy.deepcopy(model)
        self.model_ema = copy.deepcopy(model)
        for p in self.model_ema.parameters():
            p.detach_()

    def step(self, x, views):
        """views(): the list of augmented batches (called only when the confidence is low, as imagenet/cotta.py)."""
        with torch.enable_grad():
            outputs = self.model(x)
            anchor_prob = torch.softmax(self.model_anchor(x), dim=1).max(1)[0]
            standard_ema = self.model_ema(x)
            if anchor_prob.mean(0) < self.ap:
                outputs_ema = torch.stack([self.model_ema(v).detach() for v in views()]).mean(0)
            else:
                outputs_ema = standard_ema
            t = outputs_ema.detach()
            if self.symmetric:
                loss = (-0.5 * (t.softmax(1) * outputs.log_softmax(1)).sum(1)
                        - 0.5 * (outputs.softmax(1) * t.log_softmax(1)).sum(1)).mean(0)
            else:
                loss = (-(t.softmax(1) * outputs.log_softmax(1)).sum(1)).mean(0)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
        for e, p in zip(self.model_ema.parameters(), self.model.parameters()):
            e.data[:] = self.mt * e[:].data[:] + (1 - self.mt) * p[:].data[:]
        torch.manual_seed(SEED)  # the same restore draws as the strategy (see `record_views`)
        restored = {}
        for nm, m in self.model.named_modules():
            for npp, p in m.named_parameters():
                if npp in ["weight", "bias"] and p.requires_grad:
                    mask = (torch.rand(p.shape) < self.rst).float()
                    restored[f"{nm}.{npp}"] = mask.bool()
                    with torch.no_grad():
                        p.data = self.model_state[f"{nm}.{npp}"] * mask + p * (1.0 - mask)
        return outputs_ema.detach(), loss.detach(), restored


# --- the comparison -----------------------------------------------------------------------------------------
@pytest.fixture
def record_views(monkeypatch):
    """The strategy's views, recorded; the global RNG re-seeded after them so the restore draws are known."""
    seen = []

    def wrapped(x, n, gen=None):
        out = real(x, n, gen)
        seen.append(out)
        torch.manual_seed(SEED)
        return out

    real = cotta_mod.augment_views
    monkeypatch.setattr(cotta_mod, "augment_views", wrapped)
    return seen


SETTINGS = {
    # CIFAR code: Adam 1e-3, EMA 0.999, restore 0.01; ap 2 forces the augmentation-averaged path, ap 0 the plain one
    "cifar_aug": dict(optim="adam", lr=1e-3, ema=0.999, restore_prob=0.01, ap=2.0, loss="ce"),
    "cifar_plain": dict(optim="adam", lr=1e-3, ema=0.999, restore_prob=0.01, ap=0.0, loss="ce"),
    # ImageNet code: SGD 0.01 nesterov, restore 0.001, symmetric CE; ap 2 forces the views
    "imagenet_aug": dict(optim="sgd", lr=0.01, momentum=0.9, nesterov=True, ema=0.999, restore_prob=0.001, ap=2.0,
                         loss="sce"),
}


@pytest.mark.parametrize("setting,view_pass", [(s, "viewwise") for s in sorted(SETTINGS)]
                         + [("cifar_aug", "sequential")])
def test_cotta_step_equals_the_reference(setting, view_pass, record_views):
    kw = SETTINGS[setting]
    n_aug, steps = 6, 3
    src = source_model()
    strat = CoTTA(n_aug=n_aug, view_pass=view_pass, **kw)
    strat.setup(copy.deepcopy(src), info())
    ref_model = ref_configure(copy.deepcopy(src))
    opt = (torch.optim.Adam(ref_model.parameters(), lr=kw["lr"], betas=(0.9, 0.999), weight_decay=0.0)
           if kw["optim"] == "adam" else
           torch.optim.SGD(ref_model.parameters(), lr=kw["lr"], momentum=0.9, dampening=0, weight_decay=0.0,
                           nesterov=True))
    ref = RefCoTTA(ref_model, opt, kw["ema"], kw["restore_prob"], kw["ap"], kw["loss"] == "sce")
    gen = torch.Generator().manual_seed(5)
    # a teacher that differs from the student, as mid-stream: with teacher == student the plain path's first
    # gradient is zero up to rounding, and Adam's first step would amplify rounding noise (in both)
    with torch.no_grad():
        for name, e in ref.model_ema.named_parameters():
            d = 0.05 * torch.randn(e.shape, generator=gen)
            e.add_(d)
            strat.teacher.offline[name].add_(d)
    any_restored = 0
    for step in range(steps):
        x = torch.rand(10, 3, 8, 8, generator=gen)
        record_views.clear()
        torch.manual_seed(SEED)  # the plain path draws nothing before the restore
        out = strat.adapt(x)
        views = lambda: list(record_views[-1].chunk(n_aug))  # noqa: E731 - the same views, one pass each
        want, loss, restored = ref.step(x, views)
        assert bool(record_views) == (kw["ap"] > 1)
        assert torch.allclose(out, want, atol=1e-5), (step, (out - want).abs().max())
        assert torch.allclose(strat.last_loss, loss, atol=1e-6)
        student = dict(strat.backbone.named_parameters())
        for name, p in ref_model.named_parameters():
            assert torch.allclose(student[name], p, atol=1e-5), (step, name, (student[name] - p).abs().max())
            assert torch.allclose(strat.teacher.offline[name], dict(ref.model_ema.named_parameters())[name],
                                  atol=1e-6), (step, name)
            # the restored elements are exactly the source values, at the same places
            src_val = dict(src.named_parameters())[name]
            assert torch.equal(student[name][restored[name]], src_val[restored[name]])
            any_restored += int(restored[name].sum())
    assert any_restored > 0
    # the anchor stays at the source (and keeps no running statistics), the student moved
    for (name, a), s in zip(strat.anchor[0].named_parameters(), src.parameters()):
        assert torch.equal(a, s), name
    assert all(m.running_mean is None for m in strat.anchor[0].modules() if isinstance(m, nn.BatchNorm2d))
    assert any(not torch.equal(p, s) for p, s in zip(strat.backbone.parameters(), src.parameters()))


def test_pooled_views_are_not_the_reference(record_views):
    """The old single pass with pooled BN statistics gives other pseudo-labels (why defect 2 mattered)."""
    src = source_model()
    out = {}
    for mode in ("viewwise", "pooled"):
        strat = CoTTA(n_aug=6, ap=2.0, view_pass=mode)
        strat.setup(copy.deepcopy(src), info())
        torch.manual_seed(0)
        out[mode] = strat.adapt(torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(5)))
    assert not torch.allclose(out["viewwise"], out["pooled"], atol=1e-3)


def test_view_pass_rejects_unknown_modes():
    from cl.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="view_pass"):
        CoTTA(view_pass="one")

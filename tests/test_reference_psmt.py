"""Reference-step test for PSMT (issue 19): an independent, minimal re-statement of JiaxuTian/PSMT's adaptation
step and source Fisher, run on the same tiny BN network and batches as `strategies.psmt.PSMT`, compared
numerically.

Re-stated from JiaxuTian/PSMT (2c74335) classification/methods/psmt.py:
- :17-24 SymmetricCrossEntropy (alpha 0.5); :27-35 find_quantile (sorted, linear interpolation);
- :108-126 the source Fisher: per batch CE against the model's own argmax, squared gradients summed over batches
  and divided by their number at the last one, the parameter values kept as the EWC anchor;
- :131-204 forward_and_adapt: the student on the plain batch in its own pass (:139-140) and on the augmented batch
  (:142; the code then overwrites it with the plain one, :143), the anchor confidence (:146), the teacher average
  of 32 passes when it is below `ap` (:150-157; the code passes un-augmented images, :152), the loss
  0.5 SCE + 0.5 SCE + 500 Σ F (θ − θ_src)² (:162-169), the per-element g² and its perc quantile (:172-181), the
  step, the EMA of all (:187), the restore of g² < quantile to the source (:190-201), the second EMA that copies
  the restored elements (:202-203, :50-54), and the returned teacher + student logits (:204);
- :216-234 configure_model (eval mode, BN without running statistics, everything trainable).
`augment=True` restates the same step with :143 and :152 using real views (the paper; the strategy's default),
the views being the strategy's own (recorded); `teacher_update="paper"` replaces :187-203 by the paper's masked
EMA (critical = g² at or above the 1 − perc quantile, frozen), then the same restore.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import strategies.cotta as cotta_mod
import strategies.psmt as psmt_mod
from cl.engine.stream import StreamInfo
from strategies.psmt import PSMT
from tta_tiny import Tiny, source_model as tiny_source_model  # noqa: F401

pytestmark = pytest.mark.unit


def source_model():
    return tiny_source_model(source_statistics=False)


def info():
    return StreamInfo(name="t", kind="tta", n_classes=5, n_experiences=1, class_order=list(range(5)))


# --- the reference, re-stated -----------------------------------------------------------------------------
def sce(x, x_ema, alpha=0.5):
    return -(1 - alpha) * (x_ema.softmax(1) * x.log_softmax(1)).sum(1) - alpha * (x.softmax(1) * x_ema.log_softmax(1)).sum(1)


def find_quantile(arr, perc):
    s = torch.sort(arr).values
    idx = perc * (len(s) - 1)
    lo = int(idx)
    return s[lo] + (s[lo + 1] - s[lo]) * (idx - lo)


def ref_configure(model):
    model.eval()
    model.requires_grad_(True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return model


class RefPSMT:
    def __init__(self, model, fisher_loader, lr, mt, ap, perc, lamb=500.0):
        self.model, self.mt, self.ap, self.perc, self.lamb = model, mt, ap, perc, lamb
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
        self.model_ema = copy.deepcopy(model)
        self.model_anchor = copy.deepcopy(model)
        for p in [*self.model_ema.parameters(), *self.model_anchor.parameters()]:
            p.detach_()
        self.source_state = copy.deepcopy(model.state_dict())
        ewc_optimizer = torch.optim.SGD(model.parameters(), 0.01)
        self.fishers = {}
        for it, (images, _) in enumerate(fisher_loader, start=1):
            outputs = model(images)
            loss = nn.CrossEntropyLoss()(outputs, outputs.max(1)[1])
            loss.backward()
            for name, param in model.named_parameters():
                if param.grad is not None:
                    fisher = param.grad.data.clone() ** 2 + (self.fishers[name][0] if it > 1 else 0)
                    if it == len(fisher_loader):
                        fisher = fisher / it
                    self.fishers[name] = [fisher, param.data.clone()]
            ewc_optimizer.zero_grad()

    def step(self, x, student_view, teacher_views, n_aug, teacher_update):
        """student_view / teacher_views: None (the released code: plain images) or the recorded views."""
        with torch.enable_grad():
            self.optimizer.zero_grad()
            outputs_test = self.model(x)
            outputs_aug_test = self.model(x if student_view is None else student_view)  # its own BN pass
            anchor_prob = torch.softmax(self.model_anchor(x), dim=1).max(1)[0]
            if anchor_prob.mean(0) < self.ap:
                views = [x] * n_aug if teacher_views is None else list(teacher_views.chunk(n_aug))
                outputs_ema = torch.stack([self.model_ema(v).detach() for v in views]).mean(0)
            else:
                outputs_ema = self.model_ema(x)
            loss = (0.5 * sce(outputs_test, outputs_ema) + 0.5 * sce(outputs_aug_test, outputs_ema)).mean(0)
            for name, param in self.model.named_parameters():
                loss = loss + self.lamb * (self.fishers[name][0] * (param - self.fishers[name][1]) ** 2).sum()
            loss.backward()
        fisher = {n: p.grad.data.clone().pow(2) for n, p in self.model.named_parameters()}
        flat = torch.cat([f.reshape(-1) for f in fisher.values()])
        threshold = find_quantile(flat, self.perc)
        self.optimizer.step()
        self.optimizer.zero_grad()
        ema = dict(self.model_ema.named_parameters())
        if teacher_update == "paper":  # θ' <- m θ' + (1 - m)(α θ' + (1 - α) θ), m: the critical elements
            high = find_quantile(flat, 1 - self.perc)
            for n, p in self.model.named_parameters():
                m = (fisher[n] >= high).float()
                ema[n].data = m * ema[n].data + (1 - m) * (self.mt * ema[n].data + (1 - self.mt) * p.data)
        else:
            for n, p in self.model.named_parameters():
                ema[n].data[:] = self.mt * ema[n][:].data[:] + (1 - self.mt) * p[:].data[:]
        masks = {}
        for n, p in self.model.named_parameters():
            masks[n] = (fisher[n] < threshold).float()
            with torch.no_grad():
                p.data = self.source_state[n] * masks[n] + p * (1.0 - masks[n])
        if teacher_update == "code":
            for n, p in self.model.named_parameters():
                ema[n].data = masks[n] * p.data + (1 - masks[n]) * (self.mt * ema[n].data + (1 - self.mt) * p.data)
        return (outputs_ema + outputs_test).detach(), loss.detach(), {n: m.bool() for n, m in masks.items()}


# --- the comparison -----------------------------------------------------------------------------------------
@pytest.fixture
def record_views(monkeypatch):
    seen = []
    real = cotta_mod.augment_views

    def wrapped(x, n, gen=None):
        out = real(x, n, gen)
        seen.append(out)
        return out

    monkeypatch.setattr(cotta_mod, "augment_views", wrapped)
    monkeypatch.setattr(psmt_mod, "augment_views", wrapped)
    return seen


def _source_data(n=24):
    g = torch.Generator().manual_seed(3)
    return TensorDataset(torch.rand(n, 3, 8, 8, generator=g), torch.zeros(n, dtype=torch.long))


CASES = {  # (teacher_update, augment, ap): ap 2 forces the augmentation-averaged branch, ap 0 the plain one
    "code_noaug_forced": ("code", False, 2.0),
    "code_noaug_plain": ("code", False, 0.0),
    "code_aug_forced": ("code", True, 2.0),
    "paper_aug_forced": ("paper", True, 2.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_psmt_step_equals_the_reference(case, record_views):
    teacher_update, augment, ap = CASES[case]
    n_aug, lr, mt, perc = 4, 1e-3, 0.99, 0.1
    src = source_model()
    data = _source_data()
    strat = PSMT(n_aug=n_aug, lr=lr, ema=mt, ap=ap, perc=perc, fisher_batch_size=10, teacher_update=teacher_update,
                 augment=augment)
    strat.setup(copy.deepcopy(src), info())
    strat.source_fisher(data)
    ref = RefPSMT(ref_configure(copy.deepcopy(src)), DataLoader(data, batch_size=10, shuffle=False), lr, mt, ap, perc)
    # the source Fisher (psmt.py:108-126): same values, anchored at the source weights
    for (name, _), f in zip(strat.params.items(), strat.fishers()):
        assert torch.allclose(f, ref.fishers[name][0], rtol=1e-5, atol=1e-12), name
        assert f.abs().sum() > 0
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # a teacher unlike the student (mid-stream); else the first gradient is rounding noise
        for name, e in ref.model_ema.named_parameters():
            d = 0.05 * torch.randn(e.shape, generator=gen)
            e.add_(d)
            strat.teacher.offline[name].add_(d)
    for step in range(3):
        x = torch.rand(10, 3, 8, 8, generator=gen)
        record_views.clear()
        out = strat.adapt(x)
        teacher_views = next((v for v in record_views if v.shape[0] == n_aug * 10), None)
        student_view = next((v for v in record_views if v.shape[0] == 10), None)
        assert (student_view is not None) == augment and (teacher_views is not None) == (augment and ap > 1)
        want, loss, restored = ref.step(x, student_view, teacher_views, n_aug, teacher_update)
        assert torch.allclose(out, want, atol=1e-5), (step, (out - want).abs().max())
        assert torch.allclose(strat.last_loss, loss, rtol=1e-5), (strat.last_loss, loss)
        ema = dict(ref.model_ema.named_parameters())
        n_restored = 0
        for (name, p), s in zip(ref.model.named_parameters(), strat.teacher.source_tensors()):
            mine = strat.params[name]
            assert torch.allclose(mine, p, atol=1e-5), (step, name, (mine - p).abs().max())
            assert torch.allclose(strat.teacher.offline[name], ema[name], atol=1e-6), (step, name)
            assert torch.equal(mine[restored[name]], s[restored[name]])  # restored: exactly the source values
            n_restored += int(restored[name].sum())
        total = sum(p.numel() for p in strat.params.values())
        assert 0 < n_restored <= perc * total + 1
    for a, s in zip(strat.anchor[0].parameters(), src.parameters()):  # the anchor stays at the source
        assert torch.equal(a, s)


def test_quantile_is_the_reference_interpolation():
    g = torch.Generator().manual_seed(0)
    for n in (2, 7, 1000):
        v = torch.rand(n, generator=g)
        for q in (0.0, 0.03, 0.5, 0.97):
            assert torch.allclose(psmt_mod.quantile(v, q), find_quantile(v, q))


def test_teacher_update_rejects_unknown_modes():
    from cl.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="teacher_update"):
        PSMT(teacher_update="both")

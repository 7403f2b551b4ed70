"""CoSO against a re-statement of the reference step (quinn-ch/CoSO, read at 1a50a11), two tasks on a tiny ViT,
and the reference's own behaviour where the project's optional extra projection of P (cl/models/subspace.py
`project_p`) differs.

The re-statement, written from the reference and sharing nothing with cl/models/subspace.py:
- DoubleSVD.increment_update (coso/coso_projector.py:16-38): U, s = svd(G); P = U[:, :proj_rank]; FD with rank r2:
  shrink by s[r2]^2; merge [decay * S, Q] through a second SVD and shrink again;
- CoSOProjector.project (:61-73): G' = G - M M^T G when cur_task > 0; refresh when P is None or step % gap == 0;
  R = P^T G'; project_back: P (m / (sqrt(v) + eps));
- CoSOAdamW.step (coso/adamw.py:55-105): Adam with bias correction in the step size, eps 1e-6, wd 0;
- task end (models/coso.py:113-130): update_historical_space(threshold) (k = #{cumsum(s^2 / sum s^2) < thr},
  M <- [M, U_S[:, :k]]), update_projector(t) (sketch and P dropped), step = 0, moments dropped;
- loss (models/coso.py:165-172): CE(head_t(f(x)) / T, y - known classes).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.models.backbones import Backbone
from cl.engine.stream import Experience, StreamInfo
from cl.engine.strategy import Batch
from cl.models.subspace import CoSOAdam
from cl.app.testbeds.synthetic_forget import make_vit
from strategies.coso import CoSO

pytestmark = pytest.mark.unit

R1, R2, GAP, THR, T, LR, FC_LR = 3, 5, 1, 0.98, 3.0, 1e-3, 2e-3


class RefProjector:
    def __init__(self):
        self.cur_task, self.M, self.P, self.S, self.S_u, self.S_s = 0, None, None, None, None, None

    def _fd(self, u, s):
        head = s[:R2 + 1]
        shrunk = torch.sqrt(torch.maximum(head ** 2 - head[R2] ** 2, torch.tensor(0.0)))
        return u[:, :R2] @ torch.diag(shrunk[:R2]), u[:, :R2], shrunk[:R2]

    def project(self, g, step):
        if self.cur_task > 0:
            g = g - self.M @ (self.M.T @ g)
        if self.P is None or step % GAP == 0:
            u, s, _ = torch.linalg.svd(g, full_matrices=False)
            self.P = u[:, :R1]
            update, uu, ss = self._fd(u, s)
            if self.S is None:
                self.S, self.S_u, self.S_s = update, uu, ss
            else:
                mu, ms, _ = torch.linalg.svd(torch.cat([1.0 * self.S, update], dim=1), full_matrices=False)
                self.S, self.S_u, self.S_s = self._fd(mu, ms)
        return self.P.T @ g

    def task_end(self, new_task):
        ratio = self.S_s ** 2 / (self.S_s ** 2).sum()
        k = int(torch.sum(torch.cumsum(ratio, 0) < THR))
        self.M = self.S_u[:, :k] if self.M is None else torch.cat([self.M, self.S_u[:, :k]], 1)
        self.cur_task, self.S, self.P = new_task, None, None


def ref_adam_step(p, g, state, lr, projector=None):
    state.setdefault("step", 0)
    if projector is not None:
        g = projector.project(g, state["step"])
    if "m" not in state:
        state["m"], state["v"] = torch.zeros_like(g), torch.zeros_like(g)
    state["step"] += 1
    state["m"].mul_(0.9).add_(g, alpha=0.1)
    state["v"].mul_(0.999).addcmul_(g, g, value=0.001)
    step_size = lr * math.sqrt(1 - 0.999 ** state["step"]) / (1 - 0.9 ** state["step"])
    upd = state["m"] / (state["v"].sqrt() + 1e-6)
    if projector is not None:
        upd = projector.P @ upd
    p.add_(upd, alpha=-step_size)


def _setup():
    torch.manual_seed(0)
    body = make_vit({"embed_dim": 32, "depth": 2, "num_heads": 2})
    bb = Backbone(body, name="t", arch="vit", feature_dim=32, input_size=32, in_chans=3, normalize="none",
                  weights_id="random", pretrained=True)
    info = StreamInfo("s", "class_il", 4, 2, [0, 1, 2, 3], classes_per_experience=[[0, 1], [2, 3]],
                      input_shape=(3, 32, 32))
    s = CoSO(proj_rank=R1, sketch_rank=R2, update_gap=GAP, energy_threshold=THR, temperature=T, lr=LR, fc_lr=FC_LR)
    s.setup(bb, info)
    return s, info


def test_two_tasks_match_the_reference_restatement():
    s, info = _setup()
    assert s.h["head_init"] == "default" and s.h["project_p"] is False  # the reference's behaviour by default
    ref_body = copy.deepcopy(s.backbone)
    ref_w = [m.weight for n, m in ref_body.model.named_modules() if n.endswith("attn.proj")]
    for p in ref_body.parameters():
        p.requires_grad_(False)
    for w in ref_w:
        w.requires_grad_(True)
    projectors = [RefProjector() for _ in ref_w]
    w_states = [dict() for _ in ref_w]
    g = torch.Generator().manual_seed(3)
    known = 0
    for t, classes in enumerate(info.classes_per_experience):
        exp = Experience(t, None, None, classes, "class_il", t)
        s.observe_classes(exp)
        opt = s.configure_optimizer(s.begin_experience(exp))
        ref_head = copy.deepcopy(s.heads[-1])  # the new head's nn.Linear init, shared by both sides
        head_states = [dict(), dict()]
        if t > 0:  # the reference's _reset_optimizer_state_for_new_task
            for pr, st in zip(projectors, w_states):
                pr.task_end(t)
                st["step"] = 0
                st.pop("m")
                st.pop("v")
        for k in range(3):
            x = torch.rand(8, 3, 32, 32, generator=g)
            y = torch.as_tensor(classes)[torch.randint(0, 2, (8,), generator=g)]
            loss_s = s.train_step(Batch(x, y))
            loss_r = F.cross_entropy(ref_head(ref_body(x)) / T, y - known)
            torch.testing.assert_close(loss_s, loss_r, atol=1e-5, rtol=1e-5)
            opt.zero_grad()
            for p in list(ref_w) + list(ref_head.parameters()):
                p.grad = None
            loss_s.backward()
            loss_r.backward()
            for a, b in zip(s.target_weights, ref_w):
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
            opt.step()
            with torch.no_grad():
                for w, st, pr in zip(ref_w, w_states, projectors):
                    ref_adam_step(w, w.grad, st, LR, pr)
                for p, st in zip(ref_head.parameters(), head_states):
                    ref_adam_step(p, p.grad, st, FC_LR)
            for a, b in zip(s.target_weights, ref_w):
                torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-4)
            for a, b in zip(s.heads[-1].parameters(), ref_head.parameters()):
                torch.testing.assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-4)
        s.end_experience(exp, None)
        known += len(classes)
    for pr, basis in zip(projectors, s.bases):  # after task 0 (the strategy also grew them after task 1)
        assert basis.shape[1] >= pr.M.shape[1]
        torch.testing.assert_close(basis[:, :pr.M.shape[1]], pr.M, atol=1e-5, rtol=1e-4)
    s.eval()
    x = torch.rand(4, 3, 32, 32, generator=g)
    with torch.no_grad():  # predictions: both heads' logits concatenated, no temperature
        torch.testing.assert_close(s.predict(x)[:, 2:], ref_head(ref_body(x)), atol=1e-5, rtol=1e-4)


def test_the_reference_leaks_into_m_on_a_rank_deficient_gradient_and_project_p_does_not():
    """The reference takes P = U[:, :proj_rank] of G' as it is; when G' has rank < proj_rank, P's trailing columns
    are arbitrary null-space directions, M included, and Adam amplifies their noise-level coordinates. The default
    (reference) shows that leak; `project_p=True` (the project's option) removes it."""
    leaks = {}
    for project_p in (False, True):
        torch.manual_seed(0)
        w = nn.Parameter(torch.randn(12, 9))
        basis, _ = torch.linalg.qr(torch.randn(12, 3))
        opt = CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 4, "sketch_rank": 5,
                         "project_p": project_p}], lr=0.1, bases={w: basis})
        before = w.detach().clone()
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            w.grad = torch.randn(12, 1, generator=g) @ torch.randn(1, 9, generator=g)  # rank 1
            opt.step()
        delta = w.detach() - before
        leaks[project_p] = float((basis.T @ delta).norm() / delta.norm())
    assert leaks[True] < 1e-5
    assert leaks[False] > 100 * max(leaks[True], 1e-9)

"""GS-LoRA / continual forgetting: the stream, the metrics, the group penalty, the bounded loss, the merge, and
the end-to-end run on synthetic-forget."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cl.models.backbones import Backbone
from cl.engine.data import to_model_input
from cl.engine.errors import ConfigError
from cl.engine.stream import StreamInfo
from cl.engine.strategy import Batch
from cl.engine.kind_metrics import forgetting as from_history
from scenarios.kinds.forgetting import build_forgetting
from cl.app.testbeds.synthetic_forget import make_vit
from strategies.gs_lora import ForgetCycle, GSLoRA, bounded_forget_loss, group_norms, prototype_kl

pytestmark = pytest.mark.unit

SYN = {"n_classes": 6, "image_size": 32, "train_per_class": 10, "test_per_class": 4, "seed": 0}


def _stream(**kw):
    cfg = {"name": "f", "dataset": "synthetic", "synthetic": SYN, "n_requests": 2, "forget_per_request": 2,
           "val_fraction": 0.2, **kw}
    return build_forgetting(cfg)


def _strategy(**hp):
    torch.manual_seed(0)
    body = make_vit({"embed_dim": 32, "depth": 3, "num_heads": 2})
    bb = Backbone(body, name="t", arch="vit", feature_dim=32, input_size=32, in_chans=3, normalize="none",
                  weights_id="random", pretrained=True)
    bb.head = nn.Linear(32, 6)
    stream = _stream()
    s = GSLoRA(**hp)
    s.setup(bb, stream.info)
    return s, stream


def test_stream_requests_counted_down_with_disjoint_validation_and_eval_groups():
    stream = _stream()
    assert [e.classes for e in stream] == [[4, 5], [2, 3]]
    e0, e1 = stream[0], stream[1]
    assert e1.meta["retain"] == [0, 1] and e1.meta["forgotten_before"] == [4, 5]
    assert set(np.unique(e1.train.targets)) == {0, 1, 2, 3}  # earlier forgotten classes are never replayed
    assert not set(e0.train.indices) & set(e0.meta["val_forget"].indices) | set(e0.meta["val_retain"].indices) \
        & set(e0.train.indices)
    assert [g.classes for g in stream.protocol.eval_experiences] == [[4, 5], [2, 3], [0, 1]]
    assert stream.protocol.eval_initial
    few = _stream(few_shot=3)
    assert np.bincount(few[0].train.targets).tolist() == [3] * 6
    with pytest.raises(ConfigError, match="keep at least one class"):
        _stream(n_requests=3)


def test_metrics_from_history_hand_computed():
    class H:  # groups: request 0 (10 images), request 1 (10), never forgotten (20)
        acc_matrix = [[10.0, 80.0, 90.0], [0.0, 20.0, 85.0]]
        test_counts = [10, 10, 20]
        initial_accuracy = [100.0, 90.0, 95.0]
    m = from_history(H)
    assert m["acc_original"] == pytest.approx((1000 + 900 + 1900) / 40)
    r0, r1 = m["per_request"]
    assert r0["acc_retain"] == pytest.approx((800 + 1800) / 30) and r0["drop"] == 90.0
    assert r1["acc_retain"] == 85.0 and r1["acc_forget"] == 10.0 and r1["acc_old"] == 0.0
    # drop from the model at the start of request 1 (row 0: 80), not the original model (90): reference :920
    assert r1["drop"] == 60.0 and m["h_mean"] == pytest.approx(2 * 60 * 85 / 145)


def test_bounded_loss_stops_pushing_past_its_bound():
    logits = torch.tensor([[4.0, -4.0]], requires_grad=True)
    bounded_forget_loss(logits, torch.tensor([1]), bound=5.0).backward()  # CE = 8.0 > 5: no push
    assert float(logits.grad.abs().sum()) == 0.0
    logits.grad = None
    bounded_forget_loss(logits, torch.tensor([1]), bound=20.0).backward()  # CE < 20: pushed up
    assert float(logits.grad[0, 1]) > 0  # gradient descent lowers the true-class logit


def test_train_step_forget_term_vanishes_past_bound():
    s, stream = _strategy()
    s.observe_classes(stream[0])
    s.begin_experience(stream[0])
    x = torch.rand(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 4, 5])
    s.bound = 1e-6  # every forget CE is above it
    with torch.no_grad():
        past = float(s.train_step(Batch(x, y)))
        s._beta = 0.0
        assert past == pytest.approx(float(s.train_step(Batch(x, y))), abs=1e-6)


@pytest.mark.e2e
def test_group_prox_zeroes_whole_groups_and_reference_does_not():
    for prox in (True, False):
        s, stream = _strategy(group_prox=prox, lasso_alpha=20.0, prox_lr=0.05, val_every=10_000)
        s.observe_classes(stream[0])
        params = s.begin_experience(stream[0])
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        start = group_norms(s.groups).detach().clone()
        g = torch.Generator().manual_seed(0)
        for _ in range(6):  # threshold 1.0 per step: the initial group norms (~2.3) go in 3
            x, y = torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 6, (8,), generator=g)
            loss = s.train_step(Batch(x, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
            s.after_optimizer_step()
        zero = [[int(torch.count_nonzero(p)) == 0 for p in grp] for grp in s.groups]
        assert all(all(z) or not any(z) for z in zero)  # a group is exactly zero as a whole, or not at all
        assert any(all(z) for z in zero) == prox
        if not prox:  # the reference's path: the AdamW subgradient of the lasso shrinks every group, zeroes none
            assert bool((group_norms(s.groups) < start).all())


def test_merge_is_explicit_and_keeps_predictions():
    s, stream = _strategy()
    s.observe_classes(stream[0])
    s.begin_experience(stream[0])
    with torch.no_grad():
        for m in s._loras:
            m.lora_B.normal_(0, 0.5)
    x = torch.rand(4, 3, 32, 32)
    s.eval()
    before = s.predict(x)
    w = s._loras[0].weight.clone()
    assert s.merge() == 6  # 3 blocks x (fc1, fc2)
    assert not torch.equal(w, s._loras[0].weight)
    assert all(int(torch.count_nonzero(m.lora_B)) == 0 for m in s._loras)
    torch.testing.assert_close(s.predict(x), before, atol=1e-4, rtol=1e-4)


def test_backbone_without_head_is_a_clear_error():
    body = make_vit({"embed_dim": 32, "depth": 1, "num_heads": 2})
    bb = Backbone(body, name="plain", arch="vit", feature_dim=32, input_size=32, in_chans=3, normalize="none",
                  weights_id="random", pretrained=False)
    with pytest.raises(ConfigError, match="backbone=synthetic-forget"):
        GSLoRA().setup(bb, _stream().info)


def _run(compose, run_quiet, *extra, strategy="gs_lora"):
    path, lines = run_quiet(compose(f"strategy={strategy}", "scenario=synthetic-forget", *extra))
    r = json.loads(path.read_text())
    assert r["status"] == "finished" and len(r["metrics"]["per_request"]) == 2
    assert any(line.startswith("original acc") for line in lines)
    return r["metrics"]


@pytest.mark.e2e
def test_the_issue_command_runs_and_forgetting_starts(compose, run_quiet):
    """The bare `strategy=gs_lora scenario=synthetic-forget debug=fast` (5 steps per request): it finishes with every
    metric, keeps the retained classes and has begun to erase (measured: forgotten 84.4 of 100, retained 100)."""
    m = _run(compose, run_quiet, "debug=fast")
    assert {"acc_original", "acc_retain", "acc_forget", "h_mean"} <= set(m)
    assert m["acc_retain"] >= m["per_request"][-1]["acc_retain_before"] - 3.0
    assert m["acc_forget"] < m["acc_original"]


@pytest.mark.e2e
def test_end_to_end_synthetic_forget_erases_forgotten_classes(compose, run_quiet):
    """debug=fast data with 4 epochs per request (20 AdamW steps at the reference's lr 1e-2; debug=fast alone gives
    5, too few at that lr: docs/forgetting_and_sparsity.md has the measurements): forgotten classes near zero,
    retained accuracy within a few points of the original model's on the same classes."""
    m = _run(compose, run_quiet, "debug=fast", "trainer.epochs=4")
    assert m["acc_original"] > 80.0  # the cached original model knows the classes
    assert m["acc_forget"] <= 10.0
    assert m["acc_retain"] >= m["per_request"][-1]["acc_retain_before"] - 3.0


@pytest.mark.e2e
def test_end_to_end_gs_lora_pp_erases_forgotten_classes(compose, run_quiet):
    """GS-LoRA++ (prototype term on) on the same stream and budget."""
    m = _run(compose, run_quiet, "debug=fast", "trainer.epochs=4", strategy="gs_lora_pp")
    assert m["acc_forget"] <= 10.0
    assert m["acc_retain"] >= m["per_request"][-1]["acc_retain_before"] - 3.0


def test_forget_batches_cycle_a_seeded_reshuffled_order_and_resume():
    ds = torch.utils.data.TensorDataset(torch.arange(5.0)[:, None], torch.arange(5))
    c = ForgetCycle(ds, seed=3)
    first = c.next_indices(3) + c.next_indices(2)
    assert sorted(first) == [0, 1, 2, 3, 4]  # one full pass before any index repeats
    state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in c.state().items()}
    nxt = c.next_indices(7)  # crosses a reshuffle
    assert sorted(nxt[:5]) == [0, 1, 2, 3, 4]
    d = ForgetCycle(ds, seed=99)
    d.load(state)
    assert d.next_indices(7) == nxt  # restored generator and position draw the same batches


def test_training_data_is_the_retained_part_and_forget_batch_only_forgotten_classes():
    s, stream = _strategy()
    s.observe_classes(stream[0])
    s.begin_experience(stream[0])
    kept = s.training_data(stream[:1])
    assert set(np.unique(kept.targets)) == {0, 1, 2, 3}
    x, y = s.forget_batch(7)
    assert x.shape == (7, 3, 32, 32) and set(y.tolist()) <= {4, 5}


def test_prototype_term_pushes_forget_embeddings_from_their_prototype():
    """prototype_kl is 0 at the prototype; the GS-LoRA++ forget term ReLU(BND_pro - KL) descends by raising KL."""
    protos = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    emb = protos[[0, 1]].clone().requires_grad_(True)
    assert torch.allclose(prototype_kl(emb, protos), torch.zeros(2), atol=1e-6)
    emb2 = (protos[[0]] + torch.tensor([[0.5, -0.3, 0.2]])).requires_grad_(True)
    kl0 = prototype_kl(emb2, protos[[0]]).mean()
    F.relu(50.0 - kl0).backward()
    with torch.no_grad():
        kl1 = prototype_kl(emb2 - 0.5 * emb2.grad, protos[[0]]).mean()
    assert float(kl1) > float(kl0.detach()) > 0
    s, stream = _strategy(prototype=True)
    s.observe_classes(stream[0])
    s.begin_experience(stream[0])  # prototypes: class means of the frozen model's embeddings
    xs, ys = zip(*[stream[0].train[i] for i in range(len(stream[0].train))])
    ys = torch.as_tensor(ys)
    with torch.no_grad():
        emb = s.backbone(to_model_input(torch.stack(xs), 32, 3, "cpu"))
    for c in (0, 4):
        torch.testing.assert_close(s.prototypes[c], emb[ys == c].mean(0), atol=1e-4, rtol=1e-4)


@pytest.mark.e2e
def test_interrupted_request_resumes_with_the_same_forget_batches(compose, run_quiet, monkeypatch, tmp_path):
    """SIGTERM inside request 0, then the same command: same accuracy matrix and weights as an unbroken run (the
    forget cycle's generator and position are in the partial checkpoint)."""
    import os
    import signal

    from cl.engine import trainer as trainer_module
    from cl.engine.errors import RunInterrupted

    over = ["strategy=gs_lora", "scenario=synthetic-forget", "debug=fast", "trainer.limit_train_batches=3"]
    path_a, _ = run_quiet(compose(*over, f"results_root={tmp_path / 'a'}"))
    cfg = compose(*over, f"results_root={tmp_path / 'b'}")
    original, calls = trainer_module.Trainer._task_ids, {"n": 0}

    def sending(self, *args, **kwargs):  # called once per training batch, before the step
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(trainer_module.Trainer, "_task_ids", sending)
        with pytest.raises(RunInterrupted):
            run_quiet(cfg)
    path_b, lines = run_quiet(cfg)
    assert any("inside experience" in line for line in lines)
    a, b = json.loads(path_a.read_text()), json.loads(path_b.read_text())
    assert b["status"] == "finished" and b["acc_matrix"] == a["acc_matrix"]
    ckpt = lambda p: torch.load(sorted((p.parent / "checkpoints").glob("*.pt"))[-1], weights_only=False)["strategy"]
    sa, sb = ckpt(path_a), ckpt(path_b)
    for k in sa:
        if torch.is_tensor(sa[k]):
            assert torch.equal(sa[k], sb[k]), k

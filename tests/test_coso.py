"""CoSO mechanisms: updates orthogonal to the stored subspace, the FD sketch and energy rule on hand-made
gradients with known spectra, exact vs fast subspaces (hand-made and on the tiny stream's gradients), batched
refreshes, the zero-mean heads and the reference schedule; end to end against finetune on the tiny stream."""
import json
import math

import pytest
import torch

from cl.app.cli import compose_config
from cl.models.subspace import CoSOAdam, energy_rank, fd_shrink, top_subspace

pytestmark = pytest.mark.unit


def known_spectrum(m=12, n=9, sigmas=(3.0, 2.0, 1.0), seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = torch.zeros(min(m, n))
    s[:len(sigmas)] = torch.tensor(sigmas)
    return u[:, :len(s)] @ torch.diag(s) @ v[:, :len(s)].T, u


def test_energy_rule_on_a_known_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumsum 0.643, 0.929, 1.0
    assert energy_rank(s, 0.95) == 2
    assert energy_rank(s, 0.5) == 0
    assert energy_rank(s, 0.98) == 2


def test_fd_shrinks_by_the_next_singular_value():
    u, s = torch.eye(4), torch.tensor([4.0, 3.0, 1.0, 0.5])
    _, shrunk = fd_shrink(u, s, 2)
    assert torch.allclose(shrunk, torch.sqrt(torch.tensor([16.0 - 1, 9.0 - 1])))


def test_updates_stay_orthogonal_to_the_stored_subspace_and_sketch_grows_basis():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 9))
    basis, _ = torch.linalg.qr(torch.randn(12, 3))
    opt = CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 4, "sketch_rank": 5}], lr=0.1,
                   bases={w: basis})
    before = w.detach().clone()
    for _ in range(5):
        w.grad = torch.randn(12, 9)
        opt.step()
    delta = w.detach() - before
    assert delta.abs().max() > 1e-3
    assert (basis.T @ delta).abs().max() < 1e-5
    sketch = opt.state[w]["sketch_u"]
    assert (basis.T @ sketch).abs().max() < 1e-5  # the sketch lives in the complement too


def test_sketch_of_a_known_gradient_keeps_its_directions_and_energy_picks_them():
    g, u = known_spectrum()
    w = torch.nn.Parameter(torch.zeros(12, 9))
    opt = CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 2, "sketch_rank": 3}], lr=0.01)
    w.grad = g
    opt.step()
    s = opt.state[w]["sketch_s"]
    assert torch.allclose(s, torch.tensor([3.0, 2.0, 1.0]), atol=1e-5)  # sigma_4 = 0: no shrinkage
    k = energy_rank(s, 0.95)
    new = opt.state[w]["sketch_u"][:, :k]
    assert k == 2 and torch.allclose((u[:, :2].T @ new).abs(), torch.eye(2), atol=1e-5)


def test_fast_subspace_matches_exact_on_a_low_rank_gradient():
    g, _ = known_spectrum(m=64, n=48, sigmas=(5.0, 4.0, 3.0, 2.0))
    ue, se = top_subspace(g, 4, "exact")
    uf, sf = top_subspace(g, 4, "fast")
    assert torch.allclose(se[:4], sf[:4], atol=1e-4)
    assert torch.allclose((ue[:, :4].T @ uf[:, :4]).abs(), torch.eye(4), atol=1e-3)


def test_batched_refresh_equals_one_weight_at_a_time():
    torch.manual_seed(1)
    grads = [torch.randn(16, 12) for _ in range(3)]
    ws = [torch.nn.Parameter(torch.zeros(16, 12)) for _ in range(3)]
    together = CoSOAdam([{"params": ws, "subspace": True, "proj_rank": 3, "sketch_rank": 5}], lr=0.1)
    alone = [torch.nn.Parameter(torch.zeros(16, 12)) for _ in range(3)]
    singles = [CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 3, "sketch_rank": 5}], lr=0.1) for w in alone]
    for step in range(2):  # the second step merges into an existing sketch
        for w, v, g in zip(ws, alone, grads):
            w.grad, v.grad = g * (step + 1), g * (step + 1)
        together.step()
        for opt in singles:
            opt.step()
    for w, v, opt in zip(ws, alone, singles):
        assert torch.allclose(w, v, atol=1e-5)
        assert torch.allclose(together.state[w]["sketch_s"], opt.state[v]["sketch_s"], atol=1e-4)


def test_a_projection_from_a_zero_gradient_is_replaced_at_the_next_step():
    w = torch.nn.Parameter(torch.zeros(12, 9))
    opt = CoSOAdam([{"params": [w], "subspace": True, "proj_rank": 2, "sketch_rank": 3, "update_gap": 20}], lr=0.1)
    w.grad = torch.zeros(12, 9)  # a zero head passes no gradient back on its first step
    opt.step()
    assert opt.state[w]["blank"] and w.abs().max() == 0
    g, u = known_spectrum()
    w.grad = g
    opt.step()  # step 1 of a 20-step gap: refreshed anyway
    assert not opt.state[w]["blank"]
    assert torch.allclose((u[:, :2].T @ opt.state[w]["proj"]).abs(), torch.eye(2), atol=1e-5)


# --- the strategy on the tiny stream -------------------------------------------------------------------------------
TINY = ["scenario=synthetic", "backbone=vit-tiny", "debug=fast"]


def tiny_coso(*overrides):
    """A CoSO strategy on vit-tiny with the synthetic stream, and one training batch of its first experience."""
    import scenarios
    import strategies
    from cl.models import backbones

    cfg = compose_config(["strategy=coso", *TINY, "trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    strategy = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info)
    xs, ys = zip(*[stream[0].train[i] for i in range(16)])
    return strategy, stream, torch.stack(xs).float() / 255, torch.tensor(ys)


@pytest.mark.e2e
def test_fast_svd_keeps_the_exact_subspace_of_the_tiny_streams_gradients():
    """On real attn.proj gradients (vit-tiny, the synthetic stream; nn.Linear heads, since zero heads pass no
    gradient back on the first step), the fast projection captures the gradient energy of the exact one to 1%
    at r = 8, 16, 50 (randomized: q = r + 11 < 128), and the leading 16 singular values to 1%."""
    from cl.engine.strategy import Batch

    coso, stream, x, y = tiny_coso("strategy.head_init=default")
    coso.observe_classes(stream[0])
    coso.configure_optimizer(coso.begin_experience(stream[0]))
    coso.train_step(Batch(x, y)).backward()
    for w in coso.target_weights:
        g = w.grad
        for r in (8, 16, 50):
            ue, se = top_subspace(g, r, "exact")
            torch.manual_seed(0)
            uf, sf = top_subspace(g, r, "fast")
            exact, fast = (ue[:, :r].T @ g).norm() ** 2, (uf[:, :r].T @ g).norm() ** 2
            assert fast >= 0.99 * exact, (r, float(fast / exact))
        assert torch.allclose(sf[:16], se[:16], rtol=0.01)


@pytest.mark.e2e
def test_zero_heads_keep_each_heads_logits_zero_mean_and_the_schedule_is_the_references():
    """Why head_init=zeros: cross-entropy over one head's classes never moves that head's mean logit, so with
    nn.Linear's init each head keeps a random offset (w_sum . f) that decides class-IL on features with a large
    shared component; from zeros the offset stays 0 and heads compete by their learnt margins."""
    from cl.engine.strategy import Batch

    coso, stream, x, y = tiny_coso("strategy.fc_lr=0.01", "strategy.head_init=zeros")  # the option (default: nn.Linear)
    coso.observe_classes(stream[0])
    opt = coso.configure_optimizer(coso.begin_experience(stream[0]))
    for epoch in range(3):
        coso.begin_epoch(epoch, 3)
        assert math.isclose(opt.param_groups[1]["lr"], 0.01 * math.cos(99 * math.pi * epoch / 400))
        opt.zero_grad()
        coso.train_step(Batch(x, y)).backward()
        opt.step()
    head = coso.heads[0]
    assert head.weight.abs().max() > 1e-3
    assert head.weight.sum(0).abs().max() < 1e-6 and head.bias.sum().abs() < 1e-6
    logits = coso.predict(x)[:, list(stream[0].classes)]
    assert logits.mean(1).abs().max() < 1e-4


@pytest.mark.e2e
def test_the_strategy_updates_attn_proj_orthogonally_to_the_previous_tasks_basis():
    """Through the strategy with the project's `project_p` option (not the reference's default; its behaviour is
    tests/test_reference_coso.py's): task 0 trains, its end grows every target's basis M by the energy rule; task
    1's updates of the attn.proj weights then have no component in M (to float tolerance)."""
    from cl.engine.strategy import Batch

    coso, stream, _, _ = tiny_coso("strategy.head_init=default", "strategy.lr=0.01", "strategy.project_p=true")
    for t in (0, 1):
        exp = stream[t]
        xs, ys = zip(*[exp.train[i] for i in range(16)])
        x, y = torch.stack(xs).float() / 255, torch.tensor(ys)
        coso.observe_classes(exp)
        opt = coso.configure_optimizer(coso.begin_experience(exp))
        before = [w.detach().clone() for w in coso.target_weights]
        for _ in range(3):
            opt.zero_grad()
            coso.train_step(Batch(x, y)).backward()
            opt.step()
        if t == 1:
            for w, w0, m in zip(coso.target_weights, before, coso.bases):
                delta = w.detach() - w0
                assert delta.abs().max() > 1e-4
                assert (m.T @ delta).abs().max() < 1e-5 * delta.abs().max()
        state = [opt.state[w] for w in coso.target_weights]
        expected = [energy_rank(st["sketch_s"], 0.98) for st in state]
        coso.end_experience(exp, None)
        if t == 0:
            assert [b.shape[1] for b in coso.bases] == expected and min(expected) > 0


@pytest.fixture(scope="module")
def coso_runs(tmp_path_factory):
    """coso and finetune on the tiny stream with the same overrides, and coso exact vs fast at ranks 8/16 (at the
    default 50/120 the fast mode's q would reach vit-tiny's width 128, where it runs the exact SVD). debug=fast
    alone gives 2 steps per experience, in which neither learns anything (both predict one class: last acc
    10.00); 5 epochs (10 steps) as test_lae.py uses."""
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.mktemp("coso")
    out = {}
    # head_init=zeros (an option since issue 20; the default is the reference's nn.Linear init): on the random
    # vit-tiny the random head offsets decide class-IL otherwise (docs/coso.md: 13.75 with the default init)
    zeros = ["strategy.head_init=zeros"]
    small = [*zeros, "strategy.proj_rank=8", "strategy.sketch_rank=16"]
    for name, extra in (("coso", zeros), ("coso_exact16", small), ("coso_fast16", [*small, "strategy.svd=fast"]),
                        ("finetune", [])):
        cfg = compose_config([f"strategy={name.split('_')[0]}", *TINY, "trainer.epochs=5", *extra,
                              f"results_root={root}", "trainer.progress=false", "trainer.device=cpu"])
        out[name] = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
    return out


@pytest.mark.e2e
def test_coso_beats_finetune_on_the_tiny_stream(coso_runs):
    coso, ft = (coso_runs[k]["metrics"]["last_acc"] for k in ("coso", "finetune"))
    print(f"last accuracy: coso {coso:.2f}  finetune {ft:.2f}")
    assert coso > ft + 5


@pytest.mark.e2e
def test_coso_beats_finetune_under_plain_debug_fast(tmp_path):
    """The issue's literal setting: 2 steps per experience. finetune predicts one class (10.00); coso's zero-mean
    heads (`head_init=zeros`, an option) already split the test set between heads (15.62 measured; a thin margin,
    the 5-epoch test is the robust one). With the reference's head init (the default) coso also scores 10.00."""
    from cl.app.experiment import run_experiment

    last = {}
    for name in ("coso", "finetune"):
        extra = ["strategy.head_init=zeros"] if name == "coso" else []
        cfg = compose_config([f"strategy={name}", *TINY, *extra, f"results_root={tmp_path}",
                              "trainer.progress=false", "trainer.device=cpu"])
        last[name] = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())["metrics"]["last_acc"]
    assert last["coso"] > last["finetune"], last


@pytest.mark.e2e
def test_fast_svd_keeps_the_accuracy_of_exact_on_the_tiny_stream(coso_runs):
    exact, fast = (coso_runs[k]["metrics"] for k in ("coso_exact16", "coso_fast16"))
    print(f"last accuracy: exact {exact['last_acc']:.2f}  fast {fast['last_acc']:.2f}")
    assert abs(exact["last_acc"] - fast["last_acc"]) <= 5
    assert fast["last_acc"] > coso_runs["finetune"]["metrics"]["last_acc"]


@pytest.mark.e2e
def test_the_historical_subspace_grows_at_each_task_end(coso_runs):
    ranks = coso_runs["coso"]["strategy_info"]["history_rank"]  # per attn.proj (128 x 128), after the 5 tasks
    assert len(ranks) == 4 and all(0 < r < 128 for r in ranks)


@pytest.mark.e2e
def test_coso_resumes_to_the_same_matrix(compose, run_quiet, tmp_path):
    """The historical bases and the per-task heads travel in the checkpoint (get_extra_state, load_state_dict)."""
    overrides = ["strategy=coso", *TINY, "trainer.epochs=2"]
    a, _ = run_quiet(compose(*overrides, f"results_root={tmp_path / 'a'}"))
    run_quiet(compose(*overrides, f"results_root={tmp_path / 'b'}", "trainer.stop_after=2"))
    b, _ = run_quiet(compose(*overrides, f"results_root={tmp_path / 'b'}"))
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["acc_matrix"] == rb["acc_matrix"] and ra["task_il_matrix"] == rb["task_il_matrix"]
    assert ra["strategy_info"]["history_rank"] == rb["strategy_info"]["history_rank"]

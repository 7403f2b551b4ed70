"""SparCL's mechanisms one by one (exact masks, regrow, the schedule, weight and gradient masking, data removal,
FLOP accounting) and end to end against dense DER++ on the tiny stream."""
import json

import pytest
import torch
from torch import nn

from cl.engine.flops import TrainFlopMeter, count_flops, sparse_flops
from cl.engine.stream import StreamInfo
from strategies.sparcl import (ForgettingStats, IndexedView, Schedule, SparCL, exact_mask, importance, regrow,
                               sparsity_of)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("sparsity", [0.75, 0.9, 0.95])
def test_exact_mask_reaches_sparsity_exactly(sparsity):
    torch.manual_seed(0)
    w = torch.randn(64, 32, 3, 3)
    mask = exact_mask(importance(w, torch.randn_like(w)), sparsity)
    assert int((w * mask == 0).sum()) == round(sparsity * w.numel())
    assert (w * mask).abs()[mask].min() > 0


def test_importance_uses_gradient():
    w = torch.tensor([1.0, 2.0])
    g = torch.tensor([4.0, 0.0])
    assert exact_mask(importance(w, g, lmd=0.5), 0.5).tolist() == [True, False]
    assert exact_mask(importance(w, None), 0.5).tolist() == [False, True]


def test_regrow_turns_on_pruned_positions_up_to_the_bound():
    mask = exact_mask(torch.rand(1000), 0.76)
    grown = regrow(mask, 0.75, torch.Generator().manual_seed(0))
    assert int((~grown).sum()) == 750 and bool((grown | ~mask).all())  # kept stay kept, 10 regrown
    assert torch.equal(regrow(mask, 0.76, torch.Generator()), mask)  # fixed phase: no regrow


def test_schedule_is_the_reference_at_50_epochs_and_ends_fixed_when_short():
    kw = dict(ref_epochs=50, update_freq=5, decay_epochs=[5, 45], prune_bounds=[0.75, 0.76, 0.75],
              grow_bounds=[0.74, 0.75, 0.75], remove_epoch=20)
    s = Schedule(50, **kw)
    assert [e for e in range(50) if s.updates_mask(e)] == list(range(0, 50, 5))
    assert s.bounds(0) == (0.75, 0.74) and s.bounds(5) == (0.76, 0.75) and s.bounds(44) == (0.76, 0.75)
    assert s.bounds(45) == (0.75, 0.75) and s.removal_epochs() == [5, 10, 15, 20]
    one = Schedule(1, **kw)
    assert one.updates_mask(0) and one.bounds(0) == (0.75, 0.75) and one.removal_epochs() == []
    ten = Schedule(10, **kw)
    assert ten.bounds(9) == (0.75, 0.75) and ten.updates_mask(9) and ten.removal_epochs() == [1, 2, 3, 4]


def test_count_flops_linear_forward_backward():
    lin = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8)
    fwd = count_flops(lambda: lin(x))
    assert fwd == 2 * 2 * 8 * 4
    assert count_flops(lambda: lin(x).sum()) == 2 * fwd  # forward + weight-grad (input needs no grad)
    assert sparse_flops(2 * fwd, 0.25) == fwd // 2


def test_flop_meter_scales_masked_layers_by_their_densities():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False))
    meter = TrainFlopMeter()
    meter.probe(net, net, torch.rand(2, 3, 8, 8), ["0", "1"])
    f = 2 * 64 * 4 * 4 * 9  # second conv, one image
    assert meter.layers[1] == (f, 2 * f) and meter.layers[0][1] == meter.layers[0][0]  # no grad for the input
    meter.add(3)
    assert meter.total == meter.total_dense == 3 * meter.per_image
    meter.add(1, [1.0, 0.25], [1.0, 0.2])  # second conv: forward + input grad at 25%, weight grad at 20%
    assert meter.total_dense - meter.total == round((2 * f) * 0.75 + f * 0.8)


def tiny_sparcl(**kw):
    from cl.models.backbones import build

    cfg = dict(name="resnet18-tiny", source="timm-cifar", arch="resnet18", input_size=32, in_chans=3,
               normalize="none", pretrained=False, weights=None, kwargs={"channels": [8, 16, 32, 64],
                                                                          "stem_width": 8})
    torch.manual_seed(0)
    info = StreamInfo(name="t", kind="class_il", n_classes=4, n_experiences=2, class_order=[0, 1, 2, 3],
                      classes_per_experience=[[0, 1], [2, 3]])
    s = SparCL(buffer_size=8, **kw)
    s.setup(build(cfg), info)
    s.current_mask[[0, 1]] = True
    s.experiences_seen += 1
    return s


def sgd_step(s, opt, x, y):
    from cl.engine.strategy import Batch

    loss = s.train_step(Batch(x, y, raw=x))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    s.before_optimizer_step()
    opt.step()
    s.after_optimizer_step()


def test_masked_weights_stay_zero_and_gradients_are_masked():
    s = tiny_sparcl(sparsity=0.75, gradient_sample_frequency=2)
    assert len(s._weights) == 16  # the layer1..4 convs of a ResNet-18
    assert sparsity_of(s._weights) == 0.75  # the initial magnitude prune is exact
    opt = torch.optim.SGD([p for p in s.parameters() if p.requires_grad], lr=0.5)
    s.train()
    s.begin_epoch(0, 1)
    x, y = torch.rand(8, 3, 32, 32), torch.tensor([0, 1] * 4)
    sgd_step(s, opt, x, y)  # batch 0: a gradient-mask sample
    for i, w in enumerate(s._weights):
        g, m = w.grad, s.wmask(i)
        assert not bool(g[~m].any())  # no gradient where the weight is pruned
        keep = w.numel() - round(0.8 * w.numel())
        assert int((g != 0).sum()) <= keep and not bool(g[~s.gmask(i)].any())
    stored = [s.gmask(i).clone() for i in range(16)]
    sgd_step(s, opt, x, y)  # batch 1: the stored gradient mask applies
    for i, w in enumerate(s._weights):
        assert not bool(w.grad[~stored[i]].any())
        assert int((w.detach() == 0).sum()) == round(0.75 * w.numel())  # pruned weights stayed zero
    assert s.flops.total < s.flops.total_dense


def test_mask_update_uses_last_gradient_and_regrows():
    s = tiny_sparcl(sparsity=0.75)
    w = s._weights[0]
    w.grad = torch.zeros_like(w)
    pruned = ~s.wmask(0)
    w.grad[pruned] = 1e3  # a huge stale gradient on pruned positions makes them important
    s.update_masks(0.76, 0.75)
    n = w.numel()
    assert int((s.wmask(0) & pruned).sum()) >= round(0.24 * n)  # task-aware: importance saw the gradient
    assert int((~s.wmask(0)).sum()) == round(0.75 * n)
    assert int((w.detach() == 0).sum()) >= round(0.76 * n)  # regrown weights start at zero


def test_data_removal_drops_the_least_forgotten_examples():
    stats = ForgettingStats(6, torch.device("cpu"))
    idx = torch.arange(6)
    for correct in ([1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 1, 1]):
        stats.record(idx, torch.tensor(correct, dtype=torch.bool))
    # forgetting events: 0 -> 0, 1 -> 1, 2 never learned (= 3 presentations), 3 -> 1, 4 -> 0, 5 -> 1
    assert stats.scores(3).tolist() == [0, 1, 3, 1, 0, 1]
    assert stats.least_forgotten(2, never_learned=3).tolist() == [0, 4]
    ds = [(torch.zeros(1), c % 2) for c in range(6)]
    view = IndexedView(ds)
    raw = view.eval_view()
    view.remove([0, 4])
    assert len(view) == 4 and [view[i][1] for i in range(4)] == [1, 0, 1, 1]  # labels untouched
    assert view.base_index(torch.tensor([0, 3, 1])).tolist() == [1, 5, 2]  # positions -> full-set indices
    assert len(raw) == 4 and raw.base_index(torch.tensor([3])).tolist() == [5]  # the raw view follows removals


def test_removal_epoch_shrinks_the_training_set():
    s = tiny_sparcl(sparsity=0.75, remove_fraction=0.5)
    ds = [(torch.zeros(3, 32, 32, dtype=torch.uint8), i % 2) for i in range(8)]

    class Seen(list):
        pass

    class Exp:
        train = ds

    view = s.training_data(Seen([Exp()]))
    s.begin_epoch(0, 10)
    s._idx = torch.arange(8)
    from cl.engine.strategy import Batch

    s.after_forward(Batch(torch.zeros(8, 1), torch.tensor([i % 2 for i in range(8)])),
                    torch.eye(2)[[i % 2 for i in range(8)]])  # all correct: zero forgetting events
    s.begin_epoch(1, 10)  # a removal epoch at 10 epochs: 0.5 * 8 / 4 removals = 1 example
    assert len(view) == 7


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.mktemp("sparcl")
    out = {}
    for strategy in ("derpp", "sparcl"):
        cfg = compose_config([f"strategy={strategy}", "scenario=synthetic", "backbone=resnet18-tiny", "debug=fast",
                              f"results_root={root}", "trainer.progress=false", "trainer.device=cpu"])
        out[strategy] = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
    return out


@pytest.mark.e2e
def test_sparcl_end_to_end_is_exactly_sparse_and_cheaper_than_dense_derpp(tiny_pair):
    sp, dense = tiny_pair["sparcl"]["metrics"], tiny_pair["derpp"]["metrics"]
    assert tiny_pair["sparcl"]["status"] == "finished" and len(tiny_pair["sparcl"]["acc_matrix"]) == 5
    assert sp["sparsity"] == 0.75 and sp["mask_sparsity"] == 0.75
    assert dense["sparsity"] == 0.0 and dense["train_flops"] == dense["train_flops_dense"]
    assert sp["train_flops_dense"] == dense["train_flops_dense"]  # the same steps, forwards and buffer draws
    assert sp["train_flops"] < 0.5 * dense["train_flops"]

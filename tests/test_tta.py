"""Continual TTA on synthetic-c: all six strategies end to end (CI-sized), and the mechanisms the methods rest on."""
import json
import math
from pathlib import Path

import pytest
import torch

from cl.engine.stream import StreamInfo
from cl.app.testbeds.synthetic_c import build_source

pytestmark = pytest.mark.unit

STRATEGIES = [("source", ()), ("bn_adapt", ()), ("tent", ()), ("cotta", ("strategy.n_aug=4",)),
              ("ecotta", ("strategy.warmup_epochs=2",)), ("psmt", ("strategy.n_aug=4",))]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One on-disk cache for the module: the source model trains once (seconds)."""
    return str(tmp_path_factory.mktemp("tta-data"))


@pytest.fixture(scope="module")
def errors():
    """Mean errors of the runs so far (source runs first)."""
    return {}


def _info():
    return StreamInfo(name="t", kind="tta", n_classes=10, n_experiences=1, class_order=list(range(10)))


@pytest.mark.e2e
@pytest.mark.parametrize("strategy,extra", STRATEGIES)
def test_end_to_end(compose, run_quiet, data_root, errors, strategy, extra):
    cfg = compose(f"strategy={strategy}", "scenario=synthetic-c", "debug=fast", f"data_root={data_root}", *extra)
    path, _ = run_quiet(cfg)
    result = json.loads(Path(path).read_text())
    m = result["metrics"]
    domains = ["gaussian_noise_5", "impulse_noise_5", "defocus_blur_5", "contrast_5"]
    assert list(m["error_per_domain"]) == domains
    assert m["mean_error"] == pytest.approx(sum(m["error_per_domain"].values()) / 4)
    costs = result["costs"]["per_experience"]
    assert [c["domain"] for c in costs] == domains
    for c in costs:
        assert c["time_per_batch_s"] > 0 and c["forward_passes_per_batch"] >= 1 and c["peak_memory_mb"] > 0
    errors[strategy] = m["mean_error"]
    if strategy in ("bn_adapt", "tent", "cotta"):
        assert m["mean_error"] < errors["source"]
    if strategy == "cotta":  # student + anchor + teacher, plus 4 views when the anchor is unsure
        assert all(c["forward_passes_per_batch"] in (3, 7) or 3 < c["forward_passes_per_batch"] < 7 for c in costs)


@pytest.mark.e2e
def test_tent_predicts_before_update(data_root):
    from strategies.tent import Tent

    bb = build_source({"cache_dir": data_root})
    tent = Tent()
    tent.setup(bb, _info())
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        before = bb(x)
    out = tent.adapt(x)
    assert torch.allclose(out, before)
    with torch.no_grad():
        after = bb(x)
    assert not torch.allclose(after, before)


def _cotta(data_root, **kw):
    from strategies.cotta import CoTTA

    bb = build_source({"cache_dir": data_root})
    c = CoTTA(n_aug=2, **kw)
    c.setup(bb, _info())
    return c


@pytest.mark.e2e
def test_cotta_prediction_is_teacher_before_update_and_teacher_is_ema(data_root):
    from torch.func import functional_call

    torch.manual_seed(0)
    c = _cotta(data_root, ap=0.0, restore_prob=0.0, ema=0.9)  # ap 0: no augmentation, plain teacher output
    x = torch.rand(16, 3, 16, 16)
    teacher_before = {k: v.clone() for k, v in c.teacher.offline.items()}
    with torch.no_grad():
        expected = functional_call(c.backbone, teacher_before, (x,))
    out = c.adapt(x)
    assert torch.allclose(out, expected, atol=1e-6)  # the teacher's prediction, made before the step
    for name, p in c.backbone.named_parameters():  # teacher <- 0.9 teacher + 0.1 student (after the step)
        want = 0.9 * teacher_before[name] + 0.1 * p.detach()
        assert torch.allclose(c.teacher.offline[name], want, atol=1e-6), name
    assert not torch.allclose(out, functional_call(c.backbone, c.teacher.offline, (x,)).detach())


def test_cotta_restores_about_p_of_the_weights(data_root):
    torch.manual_seed(0)
    p = 0.1
    c = _cotta(data_root, ap=0.0, restore_prob=p, lr=0.05)
    source = {k: v.clone() for k, v in c.backbone.named_parameters()}
    c.adapt(torch.rand(32, 3, 16, 16))
    total = restored = 0
    for name, w in c.backbone.named_parameters():
        total += w.numel()
        restored += (w == source[name]).sum().item()
    # Adam at lr 0.05 moves every element with a gradient; the ones equal to the source were restored
    assert abs(restored / total - p) < 0.02, restored / total


def test_ecotta_saves_backward_memory_against_cotta(data_root):
    """Bytes autograd saves for backward (saved_tensors_hooks): the frozen original network as EcoTTA runs it
    against the same network trained as CoTTA's student, and the whole adaptation steps (recorded, see docs)."""
    from strategies.ecotta import EcoTTA, freeze_original
    from strategies.tta_base import SavedForBackward, use_batch_stats

    x = torch.rand(32, 3, 16, 16)
    student = build_source({"cache_dir": data_root}).model
    use_batch_stats(student)
    frozen = build_source({"cache_dir": data_root}).model
    freeze_original(frozen)
    sizes = {}
    for name, net in (("student", student), ("frozen", frozen)):
        keys = {(p.device, p.untyped_storage().data_ptr()) for p in [*net.parameters(), *net.buffers()]}
        with SavedForBackward(keys) as saved:
            h = net.stem(x).requires_grad_(True)  # a part's input needs a gradient (earlier meta networks)
            for stage in net.stages:
                h = stage(h)
        sizes[name] = saved.bytes
    assert 0 < sizes["frozen"] < 0.6 * sizes["student"], sizes

    c = _cotta(data_root, ap=0.0)
    e = EcoTTA(frozen_bn="source")  # the original keeps no activation (frozen_bn=batch keeps each BN's input)
    e.setup(build_source({"cache_dir": data_root}), _info())
    e.warmed_up.fill_(True)  # the memory of the adaptation step does not depend on the warm-up
    for name, s in (("cotta", c), ("ecotta", e)):
        with SavedForBackward(s._resident_keys()) as saved:
            s.forward_and_adapt(x.detach())
        sizes[name] = saved.bytes
    print("saved for backward, bytes:", sizes)
    # one block per part on this tiny model: the meta networks are most of what EcoTTA keeps (measured 0.61;
    # on WRN-28's real depth and partitioning 0.37, tests/test_tta_robustbench.py)
    assert 0 < sizes["ecotta"] < 0.8 * sizes["cotta"]


def test_ecotta_trains_only_meta_networks(data_root):
    from strategies.ecotta import EcoTTA

    e = EcoTTA()
    e.setup(build_source({"cache_dir": data_root}), _info())
    e.warmed_up.fill_(True)
    frozen = {k: v.clone() for k, v in e.backbone.state_dict().items()}
    meta = [p.clone() for p in e.net.meta_parameters()]
    e.adapt(torch.rand(16, 3, 16, 16))
    assert all(torch.equal(v, e.backbone.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(a, b) for a, b in zip(meta, e.net.meta_parameters()))


def test_psmt_masked_teacher_and_fisher_restore(data_root):
    from strategies.psmt import PSMT

    torch.manual_seed(0)
    s = PSMT(n_aug=2, ap=0.0, ema=0.5, perc=0.1, lr=0.05)
    s.setup(build_source({"cache_dir": data_root}), _info())
    for f in s.fishers():
        f.fill_(1e-6)
    s.fisher_ready.fill_(True)
    teacher_before = {k: v.clone() for k, v in s.teacher.offline.items()}
    x = torch.rand(16, 3, 16, 16)
    s.adapt(x)
    frozen = moved = restored = total = 0
    for (name, p), src in zip(s.params.items(), s.teacher.source_tensors()):
        t = s.teacher.offline[name]
        frozen += (t == teacher_before[name]).sum().item()
        restored += (p.detach() == src).sum().item()
        total += p.numel()
    # about perc of the elements are critical (teacher frozen) and about perc are restored to the source
    assert 0.05 < frozen / total < 0.2 and 0.05 < restored / total < 0.2, (frozen / total, restored / total)


def test_metrics_name_domains_and_average_repeats():
    from cl.engine.trainer import History
    from cl.engine.kind_metrics import tta as metrics_from_history

    h = History(acc_matrix=[[90.0], [None, 70.0], [None, None, 80.0]], test_counts=[10, 10, 10],
                costs=[{"domain": "a_1", "time_per_batch_s": 1.0}, {"domain": "b_1", "time_per_batch_s": 3.0},
                       {"domain": "a_1", "time_per_batch_s": 2.0}])
    m = metrics_from_history(h)
    assert m["error_per_domain"] == pytest.approx({"a_1": 15.0, "b_1": 30.0})
    assert m["mean_error"] == pytest.approx(20.0)
    assert m["cost_per_batch"]["time_s"] == pytest.approx(2.0)

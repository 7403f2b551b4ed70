"""cl.models.ema.MeanTeacher: the EMA update, the stochastic restore, decay 1, state round-trip, module inputs."""
import copy
import io

import pytest
import torch
from torch import nn

from cl.models.ema import MeanTeacher, _mix32

pytestmark = pytest.mark.unit


def test_offline_copy_is_the_hand_computed_ema_after_k_updates():
    torch.manual_seed(0)
    online = [torch.randn(7, 5), torch.randn(3)]
    decay = 0.7
    mt = MeanTeacher(online, decay=decay)
    hand = [t.clone() for t in online]
    for _ in range(6):
        for t in online:  # an optimiser step changes the online tensors in place
            t.add_(torch.randn_like(t))
        mt.update()
        hand = [decay * h + (1 - decay) * t for h, t in zip(hand, online)]
    for off, h in zip(mt.offline_tensors(), hand):
        assert torch.allclose(off, h, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(mt.offline_tensors()[0], online[0])  # it lags behind the online values
    assert list(mt.offline) == ["0", "1"]


def test_update_with_an_explicit_collection_and_shape_checks():
    a = {"w": torch.zeros(4)}
    mt = MeanTeacher(a, decay=0.5)
    mt.update({"w": torch.full((4,), 2.0)})
    assert torch.equal(mt.offline["w"], torch.ones(4))
    with pytest.raises(ValueError):
        mt.update({"w": torch.zeros(5)})
    with pytest.raises(ValueError):
        MeanTeacher(a, decay=1.5)


def test_decay_one_never_moves():
    online = [torch.randn(10)]
    mt = MeanTeacher(online, decay=1.0)
    before = mt.offline_tensors()[0].clone()
    for _ in range(3):
        online[0].add_(1.0)
        mt.update()
    assert torch.equal(mt.offline_tensors()[0], before)


def test_restore_resets_about_p_of_the_elements_exactly_to_the_source():
    torch.manual_seed(0)
    n, p = 200_000, 0.1
    source = -torch.rand(n) - 1.0                  # in [-2, -1)
    online = [torch.rand(n) + 1.0]                 # in [1, 2): never equal to the source
    gen = torch.Generator().manual_seed(123)
    mt = MeanTeacher(online, decay=0.9, restore_prob=p, source=[source], generator=gen)
    before = online[0].clone()
    mt.restore()
    after = online[0]
    reset = after != before
    frac = reset.float().mean().item()
    assert abs(frac - p) < 0.005                   # ~22 standard deviations of the Bernoulli mean
    assert torch.equal(after[reset], source[reset])  # the reset elements are bitwise the source's
    assert torch.equal(after[~reset], before[~reset])
    assert torch.equal(mt.offline_tensors()[0], before)  # restore touches the online tensors only

    # the same seed draws the same mask; the default source is a copy of the online tensors at construction
    again = [before.clone()]
    mt2 = MeanTeacher(again, decay=0.9, restore_prob=p, source=[source], generator=torch.Generator().manual_seed(123))
    mt2.restore()
    assert torch.equal(again[0], after)
    own = [torch.rand(1000)]
    start = own[0].clone()
    mt3 = MeanTeacher(own, decay=0.9, restore_prob=1.0)
    own[0].add_(5.0)
    mt3.restore()
    assert torch.equal(own[0], start)


def test_step_updates_with_the_pre_restore_values_then_restores():
    online = [torch.ones(1000)]
    mt = MeanTeacher(online, decay=0.5, restore_prob=0.5, source=[torch.zeros(1000)],
                     generator=torch.Generator().manual_seed(0))
    online[0].fill_(3.0)
    mt.step()
    assert torch.equal(mt.offline_tensors()[0], torch.full((1000,), 2.0))
    assert set(online[0].unique().tolist()) == {0.0, 3.0}


def test_restore_without_source_is_a_no_op_and_p_zero_keeps_no_source():
    online = [torch.randn(100)]
    mt = MeanTeacher(online, decay=0.9)
    before = online[0].clone()
    mt.restore()
    assert torch.equal(online[0], before)
    assert all(not k.startswith("source_") for k in mt.state_dict())


def test_state_dict_round_trip_with_generator_state():
    torch.manual_seed(0)
    online = [torch.randn(50), torch.randn(2, 3)]
    mt = MeanTeacher(online, decay=0.8, restore_prob=0.3, generator=torch.Generator().manual_seed(5))
    for _ in range(3):
        for t in online:
            t.add_(1.0)
        mt.step()
    buf = io.BytesIO()
    torch.save(mt.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for k, v in state.items() if k != "_extra_state")

    clone_online = [t.clone() for t in online]
    other = MeanTeacher([torch.zeros(50), torch.zeros(2, 3)], decay=0.8, restore_prob=0.3,
                        generator=torch.Generator().manual_seed(999))
    other.load_state_dict(state)
    for a, b in zip(mt.offline_tensors() + mt.source_tensors(), other.offline_tensors() + other.source_tensors()):
        assert torch.equal(a, b)
    # the generator continues from the same state: the next masks match
    mt.restore(online)
    other.restore(clone_online)
    for a, b in zip(online, clone_online):
        assert torch.equal(a, b)


def test_module_input_names_and_functional_call_on_cpu():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    mt = MeanTeacher(net, decay=0.5)
    assert list(mt.offline) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(t.device.type == "cpu" for t in mt.offline.values())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x = torch.randn(8, 4)
    for _ in range(3):
        opt.zero_grad()
        net(x).pow(2).sum().backward()
        opt.step()
        mt.update()
    teacher = copy.deepcopy(net)
    teacher.load_state_dict(mt.offline)
    out = torch.func.functional_call(net, mt.offline, (x,))
    assert torch.equal(out, teacher(x))
    assert not torch.allclose(out, net(x))
    assert not any(t.requires_grad for t in mt.offline.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none); the same MeanTeacher is tested on the CPU above")
def test_update_and_restore_on_cuda():
    online = [torch.randn(100_000, device="cuda")]
    source = online[0].clone()
    mt = MeanTeacher(online, decay=0.9, restore_prob=0.5,
                     generator=torch.Generator(device="cuda").manual_seed(0))
    online[0].add_(1.0)
    mt.step()
    assert mt.offline_tensors()[0].device.type == "cuda"
    assert torch.allclose(mt.offline_tensors()[0], source + 0.1, atol=1e-6)
    assert abs((online[0] == source).float().mean().item() - 0.5) < 0.01


# --- flat buffers and the fused kernel (issue 10) ------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(33, 17), nn.LayerNorm(17), nn.Linear(17, 5))


def _train_and_follow(mt, net, loop, steps=4, decay=0.9):
    """SGD steps on `net`; after each, mt.update() and the per-tensor reference loop on `loop`."""
    opt = torch.optim.SGD(net.parameters(), lr=0.3)
    x = torch.randn(8, 33, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        mt.update()
        with torch.no_grad():
            for ref, p in zip(loop, net.parameters()):
                ref.lerp_(p, 1.0 - decay)  # the per-tensor loop


def test_flat_and_foreach_paths_equal_the_per_tensor_loop():
    for flat_online in (None, False):
        net = _net()
        loop = [p.detach().clone() for p in net.parameters()]
        mt = MeanTeacher(net, decay=0.9, flat_online=flat_online)
        assert mt.flat_online == (flat_online is None)
        _train_and_follow(mt, net, loop)
        for off, ref in zip(mt.offline_tensors(), loop):
            assert torch.equal(off, ref)  # element for element
    # the flat path really is one buffer on both sides, and the module still trains through its parameters
    views = mt.offline_tensors()
    assert len({t.untyped_storage().data_ptr() for t in views}) == 1
    net = _net()
    MeanTeacher(net, decay=0.9)
    assert len({p.untyped_storage().data_ptr() for p in net.parameters()}) == 1


def test_flat_views_survive_moves_loads_and_copies():
    net = _net()
    loop = [p.detach().clone() for p in net.parameters()]
    mt = MeanTeacher(net, decay=0.9)
    for p in net.parameters():  # what Module.to() does to a parameter: new storage behind the same object
        p.data = p.data.clone()
    mt.to(torch.float32)
    _train_and_follow(mt, net, loop)  # re-linked at the first update
    assert len({p.untyped_storage().data_ptr() for p in net.parameters()}) == 1
    for off, ref in zip(mt.offline_tensors(), loop):
        assert torch.equal(off, ref)
    state = {k: v.clone() for k, v in mt.state_dict().items() if k != "_extra_state"}
    other = MeanTeacher(_net(), decay=0.9)
    other.load_state_dict(state, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(other.offline_tensors(), mt.offline_tensors()))
    assert len({t.untyped_storage().data_ptr() for t in other.offline_tensors()}) == 1  # copied into the views
    twin = copy.deepcopy(mt)
    assert len({t.untyped_storage().data_ptr() for t in twin.offline_tensors()}) == 1


def test_mixed_dtypes_use_the_per_tensor_copies():
    online = [torch.randn(5), torch.randn(3, dtype=torch.float64)]
    mt = MeanTeacher(online, decay=0.5)
    assert not mt.flat_online
    online[0].add_(2.0)
    online[1].add_(2.0)
    mt.update()
    assert torch.allclose(mt.offline_tensors()[1], online[1] - 1.0)
    with pytest.raises(ValueError, match="impl"):
        MeanTeacher(online, decay=0.5, impl="ext")
    with pytest.raises(ValueError, match="impl must be"):
        MeanTeacher([torch.randn(3)], decay=0.5, impl="cuda")


@pytest.mark.e2e
def test_ext_impl_equals_the_reference_loop_and_the_shared_hash(ops_ext):
    from cl.models import ops
    net = _net()
    loop = [p.detach().clone() for p in net.parameters()]
    mt = MeanTeacher(net, decay=0.9, impl="ext")
    _train_and_follow(mt, net, loop)
    for off, ref in zip(mt.offline_tensors(), loop):
        torch.testing.assert_close(off, ref, atol=1e-6, rtol=1e-6)  # the EMA: same formula, no FMA in the kernel
    # step() = one fused pass: the EMA of the pre-restore values, then the hash restore toward the source
    net = _net()
    source = [p.detach().clone() for p in net.parameters()]
    mt = MeanTeacher(net, decay=0.8, restore_prob=0.3, impl="ext", generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    off0 = torch.cat([t.flatten() for t in mt.offline_tensors()])
    on0 = torch.cat([p.detach().flatten() for p in net.parameters()])
    mt.step()
    ref_off, ref_on = off0.clone(), on0.clone()
    seed = _mix32(mt._seed_base ^ _mix32(1 * 0x9E3779B9))  # the first restore's seed
    ops.mean_teacher_update_ref(ref_off, ref_on, torch.cat([s.flatten() for s in source]), 0.8, 0.3, seed)
    torch.testing.assert_close(torch.cat([t.flatten() for t in mt.offline_tensors()]), ref_off, atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]), ref_on)
    frac = (ref_on != on0).float().mean().item()
    assert 0.25 < frac < 0.35
    # resume: the seed base and the restore count are state; a rebuilt teacher restores the same elements next
    twin_net = copy.deepcopy(net)
    twin = MeanTeacher(twin_net, decay=0.8, restore_prob=0.3, impl="ext")
    twin.load_state_dict(mt.state_dict())
    mt.step()
    twin.step()
    assert torch.equal(torch.cat([p.detach().flatten() for p in net.parameters()]),
                       torch.cat([p.detach().flatten() for p in twin_net.parameters()]))


def test_clbench_ops_env_is_a_preference(monkeypatch):
    monkeypatch.setenv("CLBENCH_OPS", "ext")
    mixed = MeanTeacher([torch.randn(5), torch.randn(3, dtype=torch.float64)], decay=0.5)
    assert mixed.impl == "torch"  # cannot use the kernel: falls back instead of failing
    monkeypatch.delenv("CLBENCH_OPS")
    assert MeanTeacher([torch.randn(5)], decay=0.5).impl == "torch"

"""cl.ema.MeanTeacher: the EMA update, the stochastic restore, decay 1, state round-trip, module inputs."""
import copy
import io

import pytest
import torch
from torch import nn

from cl.ema import MeanTeacher


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

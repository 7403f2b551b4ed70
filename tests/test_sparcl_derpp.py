"""DER++ reservoir buffer and loss: fills, then keeps exactly `size` items with reservoir probabilities; the
logit-replay term is zero for a perfect fit; the device crop + flip; the presets' input normalisation. (The
reference step, what the buffer holds and where replay starts: tests/test_reference_derpp.py.)"""
import pytest
import torch
from torch import nn

from strategies.derpp import ReservoirBuffer, derpp_buffer_loss

pytestmark = pytest.mark.unit


def test_reservoir_fills_then_stays_full():
    buf = ReservoirBuffer(5, generator=torch.Generator().manual_seed(0))
    buf.add(torch.arange(3.0)[:, None], torch.arange(3), torch.zeros(3, 2))
    assert len(buf) == 3 and buf.x[:3, 0].tolist() == [0.0, 1.0, 2.0]
    buf.add(torch.arange(3.0, 100.0)[:, None], torch.arange(3, 100), torch.zeros(97, 2))
    assert len(buf) == 5 and buf.seen == 100
    assert len(set(buf.y.tolist())) == 5
    assert torch.equal(buf.x[:, 0].long(), buf.y)  # input, label (and logits) stay together


def test_reservoir_keeps_each_example_with_probability_size_over_seen():
    counts = torch.zeros(100)
    for seed in range(300):
        buf = ReservoirBuffer(10, generator=torch.Generator().manual_seed(seed))
        for start in range(0, 100, 20):  # five batches of 20
            ids = torch.arange(start, start + 20)
            buf.add(ids[:, None].float(), ids, torch.zeros(20, 1))
        counts[buf.y] += 1
    freq = counts / 300
    assert abs(freq.mean().item() - 0.1) < 1e-6
    assert freq[:50].mean().item() == __import__("pytest").approx(0.1, abs=0.025)  # early ones not favoured
    assert freq[50:].mean().item() == __import__("pytest").approx(0.1, abs=0.025)


def test_buffer_loss_mse_term_zero_when_logits_match():
    model = nn.Linear(2, 2)
    x = torch.randn(4, 2)
    buf = ReservoirBuffer(4, generator=torch.Generator().manual_seed(0))
    buf.add(x, torch.zeros(4, dtype=torch.long), model(x))
    loss, n = derpp_buffer_loss(model, buf, 4, alpha=1.0, beta=0.0)
    assert float(loss.detach()) < 1e-10 and n == 8


def test_buffer_state_round_trips():
    buf = ReservoirBuffer(3, generator=torch.Generator().manual_seed(1), x_shape=(1,), n_logits=2)
    buf.add(torch.arange(5.0)[:, None], torch.arange(5), torch.zeros(5, 2))
    other = ReservoirBuffer(3, generator=torch.Generator().manual_seed(9), x_shape=(1,), n_logits=2)
    other.load_state_dict(buf.state_dict())
    assert other.seen == 5 and torch.equal(other.y, buf.y)
    assert torch.equal(other.sample(2)[1], buf.sample(2)[1])  # same generator state: same draws


def test_device_crop_flip_pads_with_zeros_and_flips():
    from strategies.derpp import apply_crop_flip

    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(2, 1, 1, 1)
    out = apply_crop_flip(x, 2, torch.tensor([[0, 0], [2, 2]]), torch.tensor([False, True]))
    assert out[0, 0, :2].eq(0).all() and out[0, 0, :, :2].eq(0).all() and torch.equal(out[0, 0, 2:, 2:], x[0, 0, :2, :2])
    assert torch.equal(out[1, 0], x[1, 0].flip(-1))  # offset (pad, pad) is the identity crop, then the flip


def test_cifar_presets_normalise_with_the_reference_statistics():
    from cl.models.backbones import NORMALIZATIONS
    from cl.app.cli import compose_config

    for preset, norm in (("sparcl_cifar10", "cifar10"), ("derpp_cifar10", "cifar10"),
                         ("sparcl_tiny-imagenet", "tiny-imagenet")):
        assert compose_config([f"experiment={preset}"])["backbone"]["normalize"] == norm
    assert NORMALIZATIONS["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615))  # seq_cifar10.py:65-66
    assert compose_config(["strategy=derpp", "scenario=synthetic", "backbone=resnet18-tiny"])["backbone"][
        "normalize"] == "none"  # other streams are untouched

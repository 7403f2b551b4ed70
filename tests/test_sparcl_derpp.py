"""DER++ reservoir buffer: fills, then keeps exactly `size` items; the buffer loss is zero for a perfect fit."""
import torch
from torch import nn

from strategies.derpp import ReservoirBuffer, derpp_buffer_loss


def test_reservoir_fills_then_stays_full():
    buf = ReservoirBuffer(5, generator=torch.Generator().manual_seed(0))
    buf.add(torch.arange(3.0)[:, None], torch.arange(3), torch.zeros(3, 2))
    assert len(buf) == 3 and buf.x[:3, 0].tolist() == [0.0, 1.0, 2.0]
    buf.add(torch.arange(3.0, 100.0)[:, None], torch.arange(3, 100), torch.zeros(97, 2))
    assert len(buf) == 5 and buf.seen == 100
    assert len(set(buf.y.tolist())) == 5


def test_buffer_loss_mse_term_zero_when_logits_match():
    model = nn.Linear(2, 2)
    x = torch.randn(4, 2)
    buf = ReservoirBuffer(4, generator=torch.Generator().manual_seed(0))
    buf.add(x, torch.zeros(4, dtype=torch.long), model(x))
    loss = derpp_buffer_loss(model, buf, 4, alpha=1.0, beta=0.0)
    assert float(loss.detach()) < 1e-10

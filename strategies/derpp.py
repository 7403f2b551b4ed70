"""DER++ building blocks (Buzzega et al., NeurIPS'20; mammoth utils/buffer.py): the reservoir buffer that stores
(non-augmented input, label, logits at insertion) and the DER++ loss terms.

The strategy plugin itself (trainer hooks, config) is not written yet; see docs/forgetting_and_sparsity.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class ReservoirBuffer:
    """Reservoir sampling over the whole stream: every example seen has probability size/seen of being stored."""

    def __init__(self, size: int, generator: torch.Generator | None = None):
        self.size, self.seen, self.gen = int(size), 0, generator
        self.x = self.y = self.logits = None

    def __len__(self) -> int:
        return min(self.seen, self.size)

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        if self.x is None:
            self.x = x.new_zeros((self.size, *x.shape[1:]))
            self.y = y.new_zeros((self.size,))
            self.logits = logits.new_zeros((self.size, *logits.shape[1:]))
        for i in range(x.shape[0]):
            if self.seen < self.size:
                slot = self.seen
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=self.gen))
            if slot < self.size:
                self.x[slot], self.y[slot], self.logits[slot] = x[i], y[i], logits[i].detach()
            self.seen += 1

    def sample(self, n: int):
        idx = torch.randperm(len(self), generator=self.gen)[:n]
        return self.x[idx], self.y[idx], self.logits[idx]


def derpp_buffer_loss(model, buf: ReservoirBuffer, batch_size: int, alpha: float = 0.1, beta: float = 0.5):
    """alpha * MSE(f(x_buf), z_buf) + beta * CE(f(x'_buf), y'_buf), two independent draws (SparCL's defaults)."""
    if len(buf) == 0:
        return torch.zeros(())
    x1, _, z1 = buf.sample(batch_size)
    x2, y2, _ = buf.sample(batch_size)
    return alpha * F.mse_loss(model(x1), z1) + beta * F.cross_entropy(model(x2), y2)

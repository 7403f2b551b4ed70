"""Training-FLOP counting from the layers actually run (torch.utils.flop_counter), for SparCL / DER++ costs.

WHY counted, not estimated from a formula: DER++ runs extra buffer forwards/backwards; counting one real
training step (forward + backward) captures whatever the strategy runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of everything `step()` runs, counted by FlopCounterMode; a scalar loss it returns is also backpropagated."""
    with FlopCounterMode(display=False) as counter:
        out = step()
        if isinstance(out, torch.Tensor) and out.requires_grad and out.numel() == 1:
            out.backward()
    return int(counter.get_total_flops())


def sparse_flops(dense_flops: int, density: float) -> int:
    """Analytic FLOPs of masked layers at weight density `density` (SparCL counts savings analytically)."""
    return int(round(dense_flops * float(density)))

"""SparCL building blocks (Wang et al., NeurIPS'22; `neu-spiral/SparCL` prune_utils): exact-sparsity magnitude
masks, task-aware importance |W| + lambda |grad W|, and gradient masking (DGM).

The full strategy on top of DER++ (mask schedule with random regrow, data removal) is not written yet; see
docs/forgetting_and_sparsity.md. Departure: masks are computed on the tensor's device with topk instead of
the reference's numpy percentile on CPU (same rule, exact count instead of percentile interpolation).
"""
from __future__ import annotations

import torch


def importance(weight: torch.Tensor, grad: torch.Tensor | None, lmd: float = 0.5) -> torch.Tensor:
    """|W| + lambda |grad| (lambda = sp_lmd 0.5 in the reference); grad may be None (initial prune)."""
    imp = weight.detach().abs()
    return imp if grad is None else imp + lmd * grad.detach().abs()


def exact_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the top (1 - sparsity) fraction of `score`: exactly round(sparsity*n) zeros."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = score.numel()
    keep = n - int(round(sparsity * n))
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    mask[torch.topk(score.flatten(), keep).indices] = True
    return mask.view_as(score)


def sparsity_of(tensors) -> float:
    """Fraction of exact zeros over all given tensors."""
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total

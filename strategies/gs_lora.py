"""GS-LoRA building blocks (Zhao et al., CVPR'24; `bjzhb666/GS-LoRA` engine_cl.py): the group-sparse penalty
over per-block LoRA groups and the bounded forgetting loss.

The full strategy (LoRA on both FFN linears per block via cl.peft, per-task merge, GS-LoRA++ prototype term,
validation-split checkpoint selection) is not written yet; see docs/forgetting_and_sparsity.md.

Departure: the reference optimises the group lasso by plain (sub)gradient steps with AdamW, which shrinks
groups towards zero without reaching it exactly; `prox_group_lasso` is the proximal (block soft-threshold)
step that makes "zeroes whole groups" exact. It is offered as an option, the penalty itself is the paper's.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


def lora_groups(blocks: Iterable[Iterable[torch.nn.Module]]) -> list[list[torch.Tensor]]:
    """One group per transformer block: all LoRA A/B matrices of the block's LoRALinear modules (the FFN pair)."""
    groups = []
    for mods in blocks:
        g = []
        for m in mods:
            g += [m.lora_A, m.lora_B]
        groups.append(g)
    return groups


def group_lasso(groups: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """sum_g sqrt(sum_{P in g} ||P||_F^2), the paper's group-sparse penalty (multiply by alpha outside)."""
    return torch.stack([torch.sqrt(sum((p ** 2).sum() for p in g)) for g in groups]).sum()


@torch.no_grad()
def prox_group_lasso(groups: Sequence[Sequence[torch.Tensor]], step: float) -> list[bool]:
    """Block soft-threshold: scale each group by max(0, 1 - step/||g||); returns which groups became exactly 0."""
    zeroed = []
    for g in groups:
        norm = float(torch.sqrt(sum((p ** 2).sum() for p in g)))
        scale = max(0.0, 1.0 - step / norm) if norm > 0 else 0.0
        for p in g:
            p.mul_(scale)
        zeroed.append(scale == 0.0)
    return zeroed


def bounded_forget_loss(logits_forget: torch.Tensor, y_forget: torch.Tensor, bound: float) -> torch.Tensor:
    """ReLU(BND - CE(forget)): push the forget-set CE up, but only until it reaches BND (no divergence)."""
    return F.relu(bound - F.cross_entropy(logits_forget, y_forget))

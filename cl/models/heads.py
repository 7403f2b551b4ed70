"""Classifier heads shared by the prototype-based methods."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cl.engine.errors import ConfigError


class CosineLinear(nn.Module):
    """sigma * cos(x, w_c): PILOT's CosineLinear. With `learn_sigma` the scale is a parameter initialised to 1
    (APER's first-session head); prototype heads keep sigma = 1 and set rows to class means."""

    def __init__(self, in_features: int, out_features: int, learn_sigma: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        stdv = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -stdv, stdv)
        self.sigma = nn.Parameter(torch.ones(1)) if learn_sigma else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))
        return out * self.sigma if self.sigma is not None else out


class CosFaceHead(nn.Module):
    """CosFace (Wang et al. 2018), the classifier of GS-LoRA's Face-ViT (`bjzhb666/GS-LoRA`
    vit_pytorch_face/vit_face.py:146-206): cos_c = cos(x, w_c) with a Xavier-uniform weight and no bias;
    with labels (training) the logits are s * (cos_c - m [c = y]); without, s * cos_c (the argmax of a prediction
    that cannot see the label). Defaults s = 64, m = 0.35: the reference's, for which GS-LoRA's bound BND = 105 on
    the forget cross-entropy is set (CE of these logits reaches ~2s; a plain linear head has no such scale).
    Note: the reference's `eval_data` (engine_cl.py:336) also passes the labels, so its reported accuracies count a
    sample correct only if cos_y - m beats every other cosine; `forward(x)` is the label-free prediction."""

    def __init__(self, in_features: int, out_features: int, s: float = 64.0, m: float = 0.35):
        super().__init__()
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x.float()), F.normalize(self.weight.float()))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cos = self.cosine(x)
        if labels is not None:
            cos = cos - self.m * F.one_hot(labels.long(), cos.shape[1]).to(cos.dtype)
        return self.s * cos


# --- classifier heads of a whole pre-trained classifier (continual forgetting, cl/app/testbeds/synthetic_forget.py) ---
HEADS = ("linear", "cosface")


def make_head(kind: str, dim: int, n_classes: int, cosface: Mapping[str, Any] | None = None) -> nn.Module:
    if kind not in HEADS:
        raise ConfigError(f"backbone.head={kind!r} is unknown: use one of {', '.join(HEADS)}")
    if kind == "cosface":
        return CosFaceHead(dim, n_classes, **dict(cosface or {}))
    return nn.Linear(dim, n_classes)


def head_logits(head: nn.Module, emb: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """Training logits: a CosFace head applies its margin to the labelled class (the reference's
    `model(x, labels)`), a linear head ignores the labels."""
    return head(emb, y) if isinstance(head, CosFaceHead) and y is not None else head(emb)


def check_forgetting_backbone(backbone) -> torch.nn.Module:
    """The trained classifier head a forgetting strategy starts from, or a one-line error naming the fix."""
    head = getattr(backbone, "head", None)
    if not isinstance(head, torch.nn.Module):
        raise ConfigError(f"backbone '{getattr(backbone, 'name', '?')}' has no trained classifier head: continual "
                          f"forgetting starts from a model that knows every class; use backbone=synthetic-forget "
                          f"or a preset whose backbone carries its head")
    return head

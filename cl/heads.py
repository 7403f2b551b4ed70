"""Classifier heads shared by the prototype-based methods."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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

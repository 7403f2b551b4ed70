"""Shared plumbing of the test-time adaptation strategies: the source classifier, BN modes, reset, costs.

The backbone a `tta` scenario composes is the source CLASSIFIER (`backbone.is_classifier`: `backbone(x)` gives
logits over the stream's classes; docs/tta.md). A strategy's `adapt(x)` returns the prediction for `x` made
BEFORE it updates on `x`; the trainer scores it online.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cl.errors import ConfigError
from cl.strategy import Strategy


def use_batch_stats(model: nn.Module) -> None:
    """BN normalises with the test batch's statistics (TENT/CoTTA `configure_model`: no running stats)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


def bn_affine(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in (m.weight, m.bias) if p is not None]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


class TTAStrategy(Strategy):
    supports = ("tta",)
    uses_sgd = False

    def setup(self, backbone, info) -> None:
        if not getattr(backbone, "is_classifier", False):
            raise ConfigError(f"{self.name} needs a source classifier backbone (e.g. backbone=synthetic-c or a "
                              "robustbench source), not a feature extractor")
        super().setup(backbone, info)
        self._source_state = copy.deepcopy(backbone.state_dict())
        self.configure()
        self._initial_state = copy.deepcopy(self.state_dict())

    def configure(self) -> None:
        """Put the model in its adaptation mode and build what the method keeps (optimizer, teacher)."""

    def begin_experience(self, exp):
        if exp.index > 0 and self.info.extra.get("reset_each_shift"):
            self.reset()
        return [p for p in self.parameters() if p.requires_grad]

    def reset(self) -> None:
        """Back to the source model and a fresh optimizer (TENT's `reset`, used at each domain shift)."""
        self.load_state_dict(self._initial_state)
        self.configure_state_reset()

    def configure_state_reset(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            opt.state.clear()

    @torch.no_grad()
    def predict(self, x, task_id=None):
        return self.backbone(x)

    def make_optimizer(self, params, optim: str, lr: float, momentum: float = 0.9, wd: float = 0.0,
                       nesterov: bool = False):
        if optim == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
        if optim == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        raise ConfigError(f"{self.name}: optim must be adam or sgd, got {optim!r}")

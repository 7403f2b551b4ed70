"""Nearest class mean on frozen features (Euclidean): the smallest strategy a plugin can add."""
from __future__ import annotations

import torch

from cl.engine.feature_cache import features_of
from cl.engine.features import class_means
from cl.engine.strategy import Strategy


class NCM(Strategy):
    name = "ncm"
    supports = ("class_il", "task_il", "domain_il")
    uses_sgd = False
    stored_buffers = ("means",)

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        backbone.requires_grad_(False)
        self.register_buffer("means", torch.zeros(info.n_classes, backbone.feature_dim))

    def begin_experience(self, exp):
        return []

    @torch.no_grad()
    def fit_experience(self, exp, loader, device) -> None:
        self.backbone.eval()
        feats, labels = features_of(self, None, self.backbone, exp.train, device=device)
        means, counts = class_means(feats, labels, self.info.n_classes)
        self.means[counts > 0] = means[counts > 0].to(self.means.device)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return -torch.cdist(self.backbone(x).float(), self.means)

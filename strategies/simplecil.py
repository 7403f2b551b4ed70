"""SimpleCIL: a prototype classifier on frozen pre-trained features; nothing is trained.

Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models" (IJCV 2024); reference
code zhoudw-zdw/RevisitingCIL and LAMDA-PILOT `models/simplecil.py`. For each new class the prototype
is the mean *un-normalised* feature of its training images under the test transform; prediction is the
argmax of cosine similarity (PILOT's CosineLinear with sigma = 1). Since prototypes are exact means,
old classes are never forgotten.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.feature_cache import features_of
from cl.features import class_means
from cl.strategy import Strategy


class SimpleCIL(Strategy):
    name = "simplecil"
    supports = ("class_il", "task_il", "domain_il")
    uses_sgd = False
    stored_buffers = ("prototypes",)

    def __init__(self, eval_batch_size: int = 256, **hparams):
        super().__init__(eval_batch_size=eval_batch_size, **hparams)
        self.eval_batch_size = eval_batch_size

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        backbone.requires_grad_(False)
        self.register_buffer("prototypes", torch.zeros(info.n_classes, backbone.feature_dim))
        self.register_buffer("proto_counts", torch.zeros(info.n_classes, dtype=torch.long))

    def begin_experience(self, exp):
        return []

    @torch.no_grad()
    def fit_experience(self, exp, loader, device) -> None:
        self.backbone.eval()
        feats, labels = features_of(self, "ptm", self.backbone, exp.train, device=device,
                                    batch_size=self.eval_batch_size)
        means, counts = class_means(feats, labels, self.info.n_classes)
        # Domain-IL sees a class again in a new domain: keep the running mean over all its samples.
        total = self.proto_counts + counts
        mixed = (self.prototypes * self.proto_counts.unsqueeze(1) + means * counts.unsqueeze(1))
        updated = counts > 0
        self.prototypes[updated] = (mixed[updated] / total[updated].unsqueeze(1)).to(self.prototypes.dtype)
        self.proto_counts.copy_(total)

    def frozen_encoder(self):
        return "ptm", self.backbone  # the PTM never changes: the trainer may cache its features (issue 10)

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor, task_id=None) -> torch.Tensor:
        return F.normalize(features.float(), dim=1) @ F.normalize(self.prototypes, dim=1).T

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.predict_features(self.backbone(x), task_id)

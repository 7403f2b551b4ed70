"""Sequential fine-tuning: the lower bound every method is compared with.

The whole backbone and a linear head over all classes are trained with cross-entropy on each new
experience only. Classes not seen yet are masked out of the logits, as PILOT's growing head does.
`freeze_backbone: true` gives a linear probe instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl.models.clip_heads import union_label_head
from cl.engine.strategy import Batch, Strategy


class Finetune(Strategy):
    name = "finetune"
    supports = ("class_il", "task_il", "domain_il", "text", "union_label")

    def __init__(self, freeze_backbone: bool = False, **hparams):
        super().__init__(freeze_backbone=freeze_backbone, **hparams)
        self.freeze_backbone = freeze_backbone

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        # union_label (X-TAIL): CLIP's zero-shot text-embedding classifier over every class name (cl/models/clip_heads.py)
        self.head = union_label_head(self) if info.kind == "union_label" else nn.Linear(backbone.feature_dim, info.n_classes)
        backbone.requires_grad_(not self.freeze_backbone)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def train_step(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.mask_unseen(self.logits(batch.x)), batch.y)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.logits(x)

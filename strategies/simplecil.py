"""SimpleCIL: a prototype classifier on frozen pre-trained features; nothing is trained.

Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models" (IJCV 2024); reference
code zhoudw-zdw/RevisitingCIL and LAMDA-PILOT `models/simplecil.py`. For each new class the prototype
is the mean *un-normalised* feature of its training images under the test transform; prediction is the
argmax of cosine similarity (PILOT's CosineLinear with sigma = 1). Since prototypes are exact means,
old classes are never forgotten.

On `union_label` streams (X-TAIL) SimpleCIL is the training-free baseline with a CLIP backbone: prototypes are
mean CLIP image embeddings of the learned datasets' classes, and classes of datasets not learned yet keep CLIP's
zero-shot text classifier (cl/models/clip_heads.py). The two are fused as RAIL (Xu et al., NeurIPS'24, which defines
X-TAIL; MoRAM's X-TAIL code descends from it) fuses its adapter with zero-shot CLIP (`primal_RAIL.py`): p = softmax
of zero-shot CLIP over the whole union; where its argmax is a learned class, p <- (1 - w) p + w q with q the
"adapter" probabilities over the learned classes (zero elsewhere), w = `fusion_weight` = 0.9 (RAIL's config);
elsewhere p stands. Here q = softmax(CLIP logit scale x prototype cosine) over the learned classes: RAIL's adapter
is a ridge regression onto one-hot labels, SimpleCIL's is the prototype classifier, so q is our choice of how to
turn cosines into probabilities. Image-image and image-text cosines live on different scales, so a plain max over
both would always pick a prototype; the routing avoids that.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cl.models.clip_heads import union_label_head
from cl.engine.feature_cache import features_of
from cl.engine.features import class_means
from cl.engine.strategy import Strategy


class SimpleCIL(Strategy):
    name = "simplecil"
    supports = ("class_il", "task_il", "domain_il", "union_label")
    uses_sgd = False
    stored_buffers = ("prototypes",)

    def __init__(self, eval_batch_size: int = 256, fusion_weight: float = 0.9, **hparams):
        super().__init__(eval_batch_size=eval_batch_size, **hparams)
        self.eval_batch_size = eval_batch_size
        self.fusion_weight = float(fusion_weight)  # union_label only (RAIL's fusion_weight)

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        backbone.requires_grad_(False)
        self.register_buffer("prototypes", torch.zeros(info.n_classes, backbone.feature_dim))
        self.register_buffer("proto_counts", torch.zeros(info.n_classes, dtype=torch.long))
        # union_label: CLIP's zero-shot text classifier over every class name routes each sample (see docstring)
        self.zero_shot = union_label_head(self).requires_grad_(False) if info.kind == "union_label" else None

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
        scores = F.normalize(features.float(), dim=1) @ F.normalize(self.prototypes, dim=1).T
        if self.zero_shot is None:
            return scores
        return self.route(self.zero_shot(features), scores)

    def route(self, zero_shot: torch.Tensor, prototype_cosine: torch.Tensor) -> torch.Tensor:
        """union_label, RAIL's fusion: zero-shot probabilities, mixed with the prototype probabilities over the
        learned classes for the samples whose zero-shot prediction is a learned class."""
        learned = self.proto_counts > 0
        p = zero_shot.softmax(1)
        if not learned.any():
            return p
        scale = self.zero_shot.scale
        q = (scale * prototype_cosine).masked_fill(~learned, float("-inf")).softmax(1)
        mixed = (1 - self.fusion_weight) * p + self.fusion_weight * q
        return torch.where(learned[p.argmax(1)].unsqueeze(1), mixed, p)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.predict_features(self.backbone(x), task_id)

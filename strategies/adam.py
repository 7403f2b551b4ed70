"""APER ("ADapt And Merge", the ADAM of the first version): Zhou et al., "Revisiting Class-Incremental Learning
with Pre-Trained Models: Generalizability and Adaptivity are All You Need" (IJCV 2024).

Reference code: zhoudw-zdw/RevisitingCIL and LAMDA-PILOT `models/aper_*.py`. Algorithm:

    experience 0 only: insert a PEFT module into a copy of the pre-trained model (AdaptFormer adapters in every
        block by default, bottleneck 64, scale 0.1, dropout 0.1; or SSF, VPT-shallow, VPT-deep, full fine-tune)
        and train it with a cosine head (learnable sigma) by CE over the first experience's classes;
    every experience (0 included): the prototype of each new class is the mean of the concatenation
        [frozen PTM feature, adapted feature] of its training images (test transform);
    inference: argmax of cosine similarity to the prototypes (two backbone passes per image).

`simplecil` is the training-free special case: the frozen PTM alone, no adaptation.

Initialisation as RevisitingCIL: SSF scale ~ N(1, 0.02), shift ~ N(0, 0.02)
(`convs/vision_transformer_ssf.py:378-385`; `ssf_init_std`, 0 gives the exact identity); VPT prompts start at
zeros (`convs/vpt.py:49-52`; `vpt_init`, the VPT paper's xavier is an option); adapters down Kaiming / up zero.
Checked step by step against a re-statement of the reference for every PEFT kind:
tests/test_reference_ptm.py.

Differences from the reference (none changes the function computed; docs/fidelity_ptm.md has the table):
the first-session head covers all classes with the not-yet-seen ones masked, which is the same function as
PILOT's head of `init_cls` outputs (the masked rows only decay under weight decay and are never used);
VPT prompts are inserted after the CLS token instead of after the patch tokens (attention does not depend on
token order; the prompts carry no position embedding).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from cl.models import peft
from cl.engine.feature_cache import features_of
from cl.engine.features import class_means
from cl.models.heads import CosineLinear
from cl.engine.strategy import Batch, Strategy

PEFT_KINDS = ("adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune")
VPT_INITS = ("zeros", "xavier", "normal")


class APER(Strategy):
    name = "adam"
    supports = ("class_il", "task_il", "fscil")
    forward_passes_per_test_image = 2
    stored_buffers = ("prototypes",)

    def __init__(self, peft: str = "adapter", ffn_num: int = 64, adapter_scale: float = 0.1,
                 adapter_dropout: float = 0.1, vpt_tokens: int = 5, ssf_init_std: float = 0.02,
                 vpt_init: str = "zeros", eval_batch_size: int = 256, **hparams):
        super().__init__(peft=peft, ffn_num=ffn_num, adapter_scale=adapter_scale, adapter_dropout=adapter_dropout,
                         vpt_tokens=vpt_tokens, ssf_init_std=ssf_init_std, vpt_init=vpt_init,
                         eval_batch_size=eval_batch_size, **hparams)
        if peft not in PEFT_KINDS:
            raise ValueError(f"adam.peft must be one of {PEFT_KINDS}, got {peft!r}")
        if float(ssf_init_std) < 0:
            raise ValueError(f"adam.ssf_init_std must be >= 0 (0.02 is RevisitingCIL's), got {ssf_init_std}")
        if vpt_init not in VPT_INITS:
            raise ValueError(f"adam.vpt_init must be one of {VPT_INITS} (zeros is RevisitingCIL's), got {vpt_init!r}")
        self.h = self.hparams

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        backbone.requires_grad_(False)
        self.adapted = copy.deepcopy(backbone)  # the PTM stays untouched: its features are half the prototype
        vit = self.adapted.model
        kind = self.h["peft"]
        if kind == "adapter":
            peft.add_adapters(vit, bottleneck=self.h["ffn_num"], scale=self.h["adapter_scale"],
                              dropout=self.h["adapter_dropout"])
        elif kind == "ssf" and not hasattr(vit, "patch_embed"):
            # a CNN (EfficientNet-Lite, ResNet): SSF's per-channel scale and shift after every BatchNorm, the
            # CNN placement of SSF (Lian et al. 2022 apply it after each operation); identity at init (issue 21)
            peft.add_film_bn(vit)
        elif kind == "ssf":
            # RevisitingCIL convs/vision_transformer_ssf.py:378-385: scale ~ N(1, 0.02), shift ~ N(0, 0.02)
            peft.add_ssf(vit, init_std=float(self.h["ssf_init_std"]))
        elif kind in ("vpt_shallow", "vpt_deep"):
            # RevisitingCIL convs/vpt.py:49-52: the prompt tokens start at zeros (not VPT's xavier)
            peft.add_vpt(vit, n_tokens=self.h["vpt_tokens"], deep=kind == "vpt_deep", init=self.h["vpt_init"])
        self.first_head = CosineLinear(backbone.feature_dim, info.n_classes, learn_sigma=True)
        self.register_buffer("prototypes", torch.zeros(info.n_classes, 2 * backbone.feature_dim))

    def tuned_parameters(self) -> list:
        if self.h["peft"] == "finetune":
            return list(self.adapted.parameters())
        return peft.peft_parameters(self.adapted.model)

    def begin_experience(self, exp):
        if int(self.experiences_seen) > 1:  # the adapter is never trained again
            self.adapted.requires_grad_(False)
            self.first_head.requires_grad_(False)
            return []
        params = self.tuned_parameters()
        for p in params:
            p.requires_grad_(True)
        self.first_head.requires_grad_(True)
        return [{"params": params}, {"params": list(self.first_head.parameters())}]

    def train_step(self, batch: Batch) -> torch.Tensor:
        logits = self.first_head(self.adapted(batch.x)).masked_fill(~self.current_mask, float("-inf"))
        return F.cross_entropy(logits, batch.y)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[frozen PTM feature, adapted feature]: the 2D-dimensional representation APER merges."""
        return torch.cat([self.backbone(x).float(), self.adapted(x).float()], dim=1)

    def frozen_encoder(self):
        """After the first session both halves of the merged feature are frozen (the adapter is never trained
        again), so the trainer may encode each image once (issue 10); while it trains, no cache."""
        if int(self.experiences_seen) == 0 or any(p.requires_grad for p in self.adapted.parameters()):
            return None
        return "aper-merged", self.features

    @torch.no_grad()
    def end_experience(self, exp, loader) -> None:
        self.adapted.requires_grad_(False)
        self.eval()
        device = self.prototypes.device
        feats, labels = features_of(self, "aper-merged", self.features, exp.train, device=device,
                                    batch_size=self.h["eval_batch_size"])
        means, counts = class_means(feats, labels, self.info.n_classes)
        new = counts > 0
        self.prototypes[new] = means[new]

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor, task_id=None) -> torch.Tensor:
        return F.normalize(features.float(), dim=1) @ F.normalize(self.prototypes, dim=1).T

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.predict_features(self.features(x), task_id)

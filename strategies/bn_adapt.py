"""BN adapt (Schneider et al. 2020; CoTTA's "BN Adapt" row): normalise with each test batch's statistics, no update.

As the reference `norm.Norm(model)` (DequanWang/tent norm.py:48-65, the same file in qinenergy/cotta): every BN
normalises with the current batch's statistics, with eps 1e-5 (the reference sets it on every BN; the RobustBench
and torchvision models already use 1e-5). The reference keeps updating running statistics it never reads (train
mode); they are dropped here, which changes no output. One forward pass per batch; nothing is trained, so nothing
is saved for backward."""
from __future__ import annotations

import torch.nn as nn

from strategies.tta_base import TTAStrategy, use_batch_stats


class BNAdapt(TTAStrategy):
    name = "bn_adapt"

    def configure(self) -> None:
        self.backbone.requires_grad_(False)
        use_batch_stats(self.backbone)
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eps = 1e-5  # norm.py:55

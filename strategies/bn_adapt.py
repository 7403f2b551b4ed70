"""BN adapt (Schneider et al. 2020; CoTTA's "BN Adapt" row): normalise with each test batch's statistics, no update."""
from __future__ import annotations

import torch

from strategies.tta_base import TTAStrategy, use_batch_stats


class BNAdapt(TTAStrategy):
    name = "bn_adapt"

    def configure(self) -> None:
        self.backbone.requires_grad_(False)
        use_batch_stats(self.backbone)

    @torch.no_grad()
    def predict(self, x, task_id=None):
        return self.backbone(x)

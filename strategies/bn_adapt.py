"""BN adapt (Schneider et al. 2020; CoTTA's "BN Adapt" row): normalise with each test batch's statistics, no update.

One forward pass per batch; nothing is trained, so nothing is saved for backward."""
from __future__ import annotations

from strategies.tta_base import TTAStrategy, use_batch_stats


class BNAdapt(TTAStrategy):
    name = "bn_adapt"

    def configure(self) -> None:
        self.backbone.requires_grad_(False)
        use_batch_stats(self.backbone)

"""Source: the unadapted source model, BN with its running (source) statistics. The reference row of every table.

As `setup_source` (DequanWang/tent cifar10c.py:53-57; qinenergy/cotta imagenet/imagenetc.py:61-65): model.eval(),
the prediction is model(x), nothing updates."""
from __future__ import annotations

from strategies.tta_base import TTAStrategy


class Source(TTAStrategy):
    name = "source"

    def configure(self) -> None:
        self.backbone.eval().requires_grad_(False)

"""Source: the unadapted source model, BN with its running (source) statistics. The reference row of every table."""
from __future__ import annotations

from strategies.tta_base import TTAStrategy


class Source(TTAStrategy):
    name = "source"

    def configure(self) -> None:
        self.backbone.eval().requires_grad_(False)

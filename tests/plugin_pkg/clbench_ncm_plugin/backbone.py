"""A backbone source from a plugin: the flattened pixels, as features."""
from __future__ import annotations

from torch import nn

from cl.models.backbones import Backbone


def build_flat(cfg) -> Backbone:
    size, chans = int(cfg.get("input_size", 8)), int(cfg.get("in_chans", 1))
    return Backbone(nn.Flatten(), name=cfg.get("name", "plugin-flat"), arch="flatten", feature_dim=chans * size * size,
                    input_size=size, in_chans=chans, normalize="none", weights_id="none (pixels)", pretrained=False)

"""Where scenarios, strategies and backbones meet: the application's view of every registry.

The lower layers keep registries of their own parts only (`cl.models.backbones.SOURCES`, `scenarios`' kinds and
dataset readers, `strategies`' classes). This module adds what crosses layers: the backbone sources of the
project's test beds, which train a model on scenario data (cl/app/testbeds/), and those of installed plugins.
Call `build_backbone` rather than `cl.models.backbones.build` wherever a config may name such a source.
"""
from __future__ import annotations

from typing import Any, Mapping

from cl.models import backbones

# Test-bed sources: "module:function(cfg) -> Backbone", imported when used.
TESTBED_SOURCES: dict[str, str] = {
    "synthetic-c": "cl.app.testbeds.synthetic_c:build_source",  # CTTA source ResNet, trained once, cached
    "synthetic-forget": "cl.app.testbeds.synthetic_forget:build_source",  # original classifier + .head
    "fashion-mnist-c": "cl.app.testbeds.fashion_mnist_c:build_source",  # EfficientNet-Lite0 fine-tuned once, cached
    "vit-warmup": "cl.app.testbeds.vit_warmup:build_source",  # vit-tiny pre-trained once on disjoint procedural classes
    "open_clip": "cl.app.testbeds.xtail_warmup:build_warm_open_clip",  # open_clip + `warmup:` (clip-tiny-xtail)
}

_registered = False


def register_all() -> None:
    """Adds the test-bed sources to the backbone registry (once)."""
    global _registered
    if _registered:
        return
    for name, target in TESTBED_SOURCES.items():
        backbones.register_source(name, target)
    _registered = True


def build_backbone(cfg: Mapping[str, Any]):
    """The backbone a `configs/backbone/*.yaml` describes, whichever layer its source lives in."""
    register_all()
    return backbones.build(cfg)

"""ResNets with the CIFAR stem, built through timm (`source: timm-cifar`).

SparCL and DER++ train mammoth's ResNet-18 from scratch on 32 px (and 64 px Tiny-ImageNet) images: a 3x3,
stride-1 stem conv and no max-pool, then the usual BasicBlock stages (64-128-256-512, 1x1 conv + BN
shortcuts). timm's `resnet18` is that network except for the ImageNet stem (7x7 stride-2 conv + max-pool), which
would shrink a 32 px image to 8 px before `layer1` (16x fewer FLOPs than the reference). This source builds timm's
model (same blocks, same init, `kwargs.channels` for reduced widths) and swaps in the CIFAR stem.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from cl.models.backbones import Backbone, build_timm
from cl.engine.errors import ConfigError


def build_timm_cifar(cfg: Mapping[str, Any]) -> Backbone:
    if cfg.get("pretrained") or cfg.get("weights"):
        raise ConfigError(f"backbone '{cfg.get('name')}' (source timm-cifar) has a CIFAR stem that no pretrained "
                          f"checkpoint matches: set backbone.pretrained=false and backbone.weights=null")
    backbone = build_timm(cfg)
    model = backbone.model
    old = getattr(model, "conv1", None)
    if not isinstance(old, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ConfigError(f"source timm-cifar needs a timm ResNet (conv1 + maxpool stem), got arch '{cfg['arch']}'")
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # timm's ResNet init
    model.maxpool = nn.Identity()
    backbone.arch = f"{cfg['arch']}+cifar-stem"
    return backbone

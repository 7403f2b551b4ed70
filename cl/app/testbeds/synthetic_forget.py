"""The test-sized "original model" of continual forgetting: a small ViT classifier trained ONCE on all classes of
the synthetic split and cached on disk (backbone source `synthetic-forget`).

Why a source of its own: a forgetting stream starts from a model that already knows every class (GS-LoRA's
Face-ViT / ImageNet ViT-B/16), so the backbone must come with its trained head. The returned
`cl.models.backbones.Backbone` maps images to features as usual (a timm VisionTransformer with `num_classes=0`, so
`cl.models.peft.add_lora` finds its blocks) and carries the trained classifier as `backbone.head`
(`head(backbone(x))` = logits over all classes): `head: linear` (default) or `head: cosface`, the reference
Face-ViT's CosFace (`cl.models.heads.CosFaceHead`, s = 64, m = 0.35, trained with the margin), the head GS-LoRA's
BND = 105 is set for. Training uses only the scenario's train split minus its
validation part (`forgetting.split_validation`), so the forget/retain validation images stay unseen.
"""
from __future__ import annotations

import hashlib
import os
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cl.models.backbones import Backbone
from cl.engine.errors import ConfigError
from cl.models.heads import make_head, head_logits  # noqa: F401  (head_logits: re-exported for tests)

DEFAULT_SYNTHETIC = {"n_classes": 10, "n_domains": 1, "image_size": 32, "channels": 3,
                     "train_per_class": 60, "test_per_class": 20, "noise": 0.15, "seed": 0}
# 4 blocks (4 GS-LoRA groups), width 64, 8x8 patches of a 32 px image: ~0.2 M parameters, seconds per epoch on a CPU.
DEFAULT_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 4.0}


def make_vit(vit: Mapping[str, Any] | None, in_chans: int = 3) -> nn.Module:
    import timm

    kwargs = {**DEFAULT_VIT, **dict(vit or {})}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, in_chans=in_chans, **kwargs)


def original_split(synthetic: Mapping[str, Any] | None, val_fraction: float):
    """(train images, train labels) the original model learns from: the synthetic train split minus validation."""
    from scenarios.kinds.forgetting import split_validation
    from scenarios.datasets.synthetic import make_synthetic

    params = {**DEFAULT_SYNTHETIC, **dict(synthetic or {}), "n_domains": 1}
    train, _ = make_synthetic(**params)
    fit_idx, _ = split_validation(np.asarray(train.targets), val_fraction)
    x = torch.as_tensor(train.images[fit_idx]).float() / 255
    return x, torch.as_tensor(np.asarray(train.targets)[fit_idx]).long(), params["n_classes"]


def train_original(synthetic, vit, val_fraction: float, epochs: int, lr: float, seed: int = 0,
                   head_kind: str = "linear", cosface: Mapping[str, Any] | None = None):
    """Plain supervised training of ViT + head on all classes (AdamW, batch 32)."""
    x, y, n_classes = original_split(synthetic, val_fraction)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    body = make_vit(vit, x.shape[1])
    head = make_head(head_kind, body.num_features, n_classes, cosface)
    params = list(body.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    body.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            loss = F.cross_entropy(head_logits(head, body(x[idx]), y[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return body.eval(), head.eval()


def cached_original(cfg: Mapping[str, Any]):
    """(body, head, key): trained only when `cache_dir` has no copy for these exact settings."""
    synthetic = {**DEFAULT_SYNTHETIC, **dict(cfg.get("synthetic") or {})}
    vit = {**DEFAULT_VIT, **dict(cfg.get("vit") or {})}
    epochs, lr = int(cfg.get("epochs", 6)), float(cfg.get("lr", 1e-3))
    val_fraction = float(cfg.get("val_fraction", 0.1))
    head_kind, cosface = str(cfg.get("head", "linear")), dict(cfg.get("cosface") or {})
    settings = {"synthetic": synthetic, "vit": vit, "epochs": epochs, "lr": lr, "val_fraction": val_fraction}
    if head_kind != "linear":  # the linear head's key (and cached file) stays what it was
        settings.update(head=head_kind, cosface=cosface)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cfg.get("cache_dir") or "data/synthetic-forget-cache") / f"synthetic-forget-vit-{key}.pt"
    body = make_vit(vit, synthetic["channels"])
    head = make_head(head_kind, body.num_features, synthetic["n_classes"], cosface)
    if path.exists():
        state = torch.load(path, map_location="cpu", weights_only=True)
        body.load_state_dict(state["body"])
        head.load_state_dict(state["head"])
        return body.eval(), head.eval(), key
    from cl.engine.model_cache import isolated_rng

    # under its own RNG: a cold cache must leave the run's draws exactly as a warm one does
    with isolated_rng(0):
        body, head = train_original(synthetic, vit, val_fraction, epochs, lr, head_kind=head_kind, cosface=cosface)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"body": body.state_dict(), "head": head.state_dict()}, tmp)
    tmp.replace(path)  # atomic: a concurrent first run trains its own copy and one of them wins
    return body, head, key


def build_source(cfg: Mapping[str, Any]) -> Backbone:
    """Backbone source 'synthetic-forget': the cached original classifier (features + `.head`)."""
    if int(cfg.get("input_size", 32)) != int({**DEFAULT_VIT, **dict(cfg.get("vit") or {})}["img_size"]):
        raise ConfigError("backbone.input_size must equal backbone.vit.img_size for synthetic-forget")
    body, head, key = cached_original(cfg)
    bb = Backbone(body, name=str(cfg.get("name", "synthetic-forget-vit")), arch="vit-synthetic-forget",
                  feature_dim=int(body.num_features), input_size=int(cfg.get("input_size", 32)),
                  in_chans=int({**DEFAULT_SYNTHETIC, **dict(cfg.get("synthetic") or {})}["channels"]),
                  normalize="none", weights_id=f"synthetic-forget-trained:{key}", pretrained=True)
    bb.head = head
    return bb

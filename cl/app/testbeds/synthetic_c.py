"""The test-sized CTTA source: a small batch-norm ResNet trained ONCE on the synthetic clean split, cached on disk.

Test-time adaptation needs a source *classifier* (features and head). This module is a backbone source
(`SOURCES["synthetic-c"]`): it returns a `cl.models.backbones.Backbone` whose `model` is the whole classifier, so
`backbone(x)` gives logits over the stream's classes and `feature_dim == n_classes` (docs/tta.md).
The clean train split it was trained on is the scenario's declared source data (EcoTTA warm-up, PSMT Fisher).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl.models.backbones import Backbone
from scenarios.datasets.synthetic import SYNTHETIC_C_DEFAULTS as DEFAULT_SYNTHETIC, synthetic_c_split as source_split

# Kept small on purpose: the source model must train in seconds inside CI (issue 8), and stay a BN ResNet with
# several stages (EcoTTA attaches one meta network per stage).
DEFAULT_WIDTHS = (8, 16, 32)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem + `len(widths)` residual stages (the "parts" EcoTTA attaches meta networks to) + linear head."""

    def __init__(self, n_classes: int = 10, in_chans: int = 3, widths: tuple[int, ...] = DEFAULT_WIDTHS):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stages.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(cin, n_classes)

    def features(self, x):
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return x

    def head(self, x):
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x):
        return self.head(self.features(x))


def train_source(synthetic: Mapping[str, Any] | None, epochs: int = 6, seed: int = 0,
                 widths: tuple[int, ...] = DEFAULT_WIDTHS) -> SmallResNet:
    """Plain supervised training on the clean split (Adam lr 3e-3, batch 64); about a second on an idle CPU core
    at the scenario's default size (16 px, widths 8/16/32, 6 epochs)."""
    train, _ = source_split(synthetic)
    params = {**DEFAULT_SYNTHETIC, **dict(synthetic or {})}
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallResNet(params["n_classes"], params["channels"], tuple(widths))
    x = torch.as_tensor(train.images).float() / 255
    y = torch.as_tensor(train.targets).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def cached_source(synthetic: Mapping[str, Any] | None, cache_dir: str | Path, epochs: int = 6,
                  widths: tuple[int, ...] = DEFAULT_WIDTHS) -> tuple[SmallResNet, str]:
    """The trained source model, trained only when `cache_dir` has no copy for these settings (cl/engine/model_cache.py:
    keyed by the settings, trained under its own RNG, written atomically)."""
    from cl.engine.model_cache import cached_weights, load_weights

    widths = tuple(int(w) for w in widths)
    params = {**DEFAULT_SYNTHETIC, **dict(synthetic or {}), "epochs": epochs, "widths": list(widths)}
    path, key = cached_weights(cache_dir, "synthetic-c-source", params,
                               lambda: train_source(synthetic, epochs, widths=widths).state_dict(), seed=0)
    model = SmallResNet(params["n_classes"], params["channels"], widths)
    model.load_state_dict(load_weights(path))
    return model.eval(), key


def build_source(cfg: Mapping[str, Any]) -> Backbone:
    """Backbone source 'synthetic-c': the cached source classifier (logits out)."""
    synthetic = cfg.get("synthetic") or {}
    widths = tuple(cfg.get("widths") or DEFAULT_WIDTHS)
    model, key = cached_source(synthetic, cfg.get("cache_dir") or "data/synthetic-c-cache", int(cfg.get("epochs", 6)),
                               widths)
    params = {**DEFAULT_SYNTHETIC, **dict(synthetic)}
    bb = Backbone(model, name=str(cfg.get("name", "synthetic-c-resnet")), arch="small-bn-resnet",
                  feature_dim=params["n_classes"], input_size=int(params["image_size"]), in_chans=3, normalize="none",
                  weights_id=f"synthetic-c-trained:{key}", pretrained=True)
    bb.is_classifier = True
    return bb

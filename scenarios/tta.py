"""Scenario kind `tta`: an unlabelled stream of test batches over a sequence of corruption domains.

One experience per domain (CoTTA's protocol: severity 5, the fixed 15-corruption order, reset once at the
start). Each experience's `test` is the domain's images in a fixed order; `train` is the declared source data
(the clean split the source model was trained on) where the scenario has one, else an empty dataset.
Datasets: `synthetic-c` (generated here, batched torch corruptions, labelled `generated` in the stream info).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from cl.errors import ConfigError
from cl.stream import Experience, Stream, StreamInfo

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")


def _blur(x: torch.Tensor, k: int) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, 1)


def corrupt(x: torch.Tensor, name: str, severity: int, gen: torch.Generator) -> torch.Tensor:
    """Batched, seeded torch corruptions of float images in [0, 1] (a cheap test-sized family, not ImageNet-C)."""
    s = severity
    if name == "gaussian_noise":
        out = x + torch.randn(x.shape, generator=gen) * (0.04 * s)
    elif name == "shot_noise":
        lam = (60.0 / s)
        out = torch.poisson(x * lam, generator=gen) / lam
    elif name == "impulse_noise":
        u = torch.rand(x.shape, generator=gen)
        p = 0.03 * s
        out = torch.where(u < p / 2, torch.zeros_like(x), torch.where(u > 1 - p / 2, torch.ones_like(x), x))
    elif name == "defocus_blur":
        out = _blur(x, 2 * s + 1 if s < 3 else 5)
    elif name == "contrast":
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        out = (x - m) * (0.5 ** (s / 2)) + m
    elif name == "brightness":
        out = x + 0.1 * s
    elif name == "pixelate":
        h = x.shape[-1]
        small = F.interpolate(x, size=max(4, h // (s + 1)), mode="area")
        out = F.interpolate(small, size=h, mode="nearest")
    elif name == "fog":
        fog = _blur(torch.rand(x.shape[0], 1, *x.shape[-2:], generator=gen), 7)
        out = x * (1 - 0.12 * s) + fog * 0.12 * s
    else:
        raise ConfigError(f"synthetic-c cannot generate corruption '{name}'; use one of {GENERATED}")
    return out.clamp(0, 1)


GENERATED = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "contrast", "brightness", "pixelate", "fog")


def _domains(cfg: dict) -> list[tuple[str, int]]:
    """(corruption, severity) per experience: the fixed order at one severity, or gradual 1..5..1 per corruption."""
    names = list(cfg.get("corruptions") or CORRUPTIONS)
    severity = int(cfg.get("severity", 5))
    if not 1 <= severity <= 5:
        raise ConfigError(f"scenario.severity must be 1..5, got {severity}")
    order_seed = cfg.get("order_seed")
    if order_seed is not None:  # one of CoTTA's "several random orders"
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(int(order_seed))).tolist()
        names = [names[i] for i in perm]
    if cfg.get("gradual"):  # mariodoebler's schedule: every domain 1 -> 5 -> 1
        return [(n, s) for n in names for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    return [(n, severity) for n in names]


def build_tta(cfg: dict, data_root=None) -> Stream:
    dataset = cfg.get("dataset")
    if dataset != "synthetic-c":
        raise ConfigError(f"tta dataset '{dataset}' unknown: expected synthetic-c")
    from scenarios.synthetic_c import DEFAULT_SYNTHETIC, source_split

    params = {**DEFAULT_SYNTHETIC, **dict(cfg.get("synthetic") or {})}
    train, test = source_split(params)
    x = torch.as_tensor(test.images).float() / 255
    y = torch.as_tensor(test.targets).long()
    limit = cfg.get("limit_per_class")
    if limit:
        keep = torch.cat([torch.nonzero(y == c).flatten()[: int(limit)] for c in range(params["n_classes"])]).sort().values
        x, y = x[keep], y[keep]
    domains = _domains({**cfg, "corruptions": cfg.get("corruptions") or GENERATED[:4]})
    seed = int(cfg.get("corruption_seed", 0))
    exps = []
    classes = list(range(params["n_classes"]))
    for i, (name, sev) in enumerate(domains):
        xc = corrupt(x, name, sev, torch.Generator().manual_seed(seed * 1000 + i))
        if cfg.get("shuffle_within_domain"):  # mariodoebler shuffles within each domain with the run seed
            perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + i))
            xc, yc = xc[perm], y[perm]
        else:
            yc = y
        exps.append(Experience(i, train, TensorDataset(xc, yc), classes, "tta", domain=f"{name}_{sev}",
                               meta={"corruption": name, "severity": sev}))
    info = StreamInfo(name=cfg.get("name") or "synthetic-c", kind="tta", n_classes=params["n_classes"],
                      n_experiences=len(exps), class_order=classes, input_shape=(3, params["image_size"], params["image_size"]),
                      classes_per_experience=[classes] * len(exps),
                      extra={"domains": [e.domain for e in exps], "corruption_source": "generated",
                             "reset_each_shift": bool(cfg.get("reset_each_shift", False)),
                             "gradual": bool(cfg.get("gradual", False))})
    return Stream(exps, info)

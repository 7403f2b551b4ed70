"""Scenario kind `tta`: an unlabelled stream of test batches over a sequence of corruption domains.

One experience per domain (CoTTA's protocol: severity 5, the fixed 15-corruption order, reset once at the
start). Each experience's `test` is the domain's images in a fixed order; `train` is the declared source data
(the clean split the source model was trained on) where the scenario has one, else an empty dataset.

Datasets (`scenario.dataset`), each recorded in the stream info as `corruption_source`:
- `synthetic-c`: the test-sized stream; clbench's own batched torch corruptions of the synthetic classes
  (`generated:clbench-torch`, a cheap family, not ImageNet-C's constants);
- `cifar10-c`, `cifar100-c`: the released `.npy` files (scenarios/datasets/cifar_c.py; `released`);
- `imagenet-c`: the released folder tree, RobustBench's 5,000 images (scenarios/datasets/imagenet_c.py; `released`);
- `generated`: any registered clean test set (`scenario.clean: {dataset: ..., ...}`) corrupted on the fly by
  `imagecorruptions` (the `imagecorruptions-imaug` fork, extra `tta`; `generated:imagecorruptions`). Its
  constants are ImageNet-C's, harsher than CIFAR-10-C's on 32 px images: never comparable with the released sets.
Options: `reset_each_shift`, `gradual` (true/mariodoebler: every domain 1->5->1; cotta: the first 5->1, later
ones 1->5->1), `mixed` (all domains in one shuffled experience), `order_seed` (one random order), `orders` (several
orders one after another in one run, the strategy reset at each order's start; `mean_error_per_order`; CoTTA's
ten ImageNet-C orders are in configs/experiment/cotta_imagenetc.yaml), `shuffle_within_domain`.
Protocol: `loop="online"` (cl/engine/online.py: predict, then adapt, on each test batch in order; no training phase).
Scoring: `cl.engine.kind_metrics.tta` (error per named domain, `mean_error`, and the cost figures per batch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Subset, TensorDataset

from cl.engine import kind_metrics as km
from cl.engine.errors import ConfigError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Experience, Stream, StreamInfo

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


def _domains(cfg: dict, default_names=CORRUPTIONS) -> list[tuple[str, int]]:
    """(corruption, severity) per experience: the fixed order at one severity, gradual severities per corruption,
    or several orders one after another (`orders`: CoTTA's ImageNet-C protocol, reset at each order's start)."""
    orders = cfg.get("orders")
    if orders:
        if cfg.get("order_seed") is not None:
            raise ConfigError("scenario.orders and scenario.order_seed exclude each other: set one to null")
        out = []
        for order in orders:
            out += _domains({**cfg, "orders": None, "corruptions": list(order)}, default_names)
        return out
    names = list(cfg.get("corruptions") or default_names)
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption(s) {unknown}: scenario.corruptions takes names from {list(CORRUPTIONS)}")
    severity = int(cfg.get("severity", 5))
    if not 1 <= severity <= 5:
        raise ConfigError(f"scenario.severity must be 1..5, got {severity}")
    order_seed = cfg.get("order_seed")
    if order_seed is not None:  # one of CoTTA's "several random orders"
        perm = torch.randperm(len(names), generator=torch.Generator().manual_seed(int(order_seed))).tolist()
        names = [names[i] for i in perm]
    gradual = cfg.get("gradual")
    if gradual in (True, "mariodoebler"):  # mariodoebler's schedule: every domain 1 -> 5 -> 1
        return [(n, s) for n in names for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)]
    if gradual == "cotta":  # qinenergy/cotta cifar10c_gradual.py: the first domain 5 -> 1, later ones 1 -> 5 -> 1
        return [(n, s) for i, n in enumerate(names) for s in ((5, 4, 3, 2, 1) if i == 0 else (1, 2, 3, 4, 5, 4, 3, 2, 1))]
    if gradual not in (None, False):
        raise ConfigError(f"scenario.gradual must be false, true (= mariodoebler) or cotta, got {gradual!r}")
    return [(n, severity) for n in names]


def _order_starts(cfg: dict) -> list[int]:
    """Experience indices where a new corruption order begins (`orders`); the strategy resets there."""
    if not cfg.get("orders"):
        return []
    starts, i = [], 0
    for order in cfg["orders"]:
        starts.append(i)
        i += len(_domains({**cfg, "orders": None, "corruptions": list(order)}))
    return starts


def _limit(y: torch.Tensor, limit, n_classes: int) -> torch.Tensor:
    """Indices of the first `limit` samples of each class (debug runs), in stream order."""
    return torch.cat([torch.nonzero(y == c).flatten()[: int(limit)] for c in range(n_classes)]).sort().values


def build_tta(cfg: dict, data_root=None) -> Stream:
    dataset = cfg.get("dataset")
    builders = {"synthetic-c": _synthetic_c, "cifar10-c": _cifar_c, "cifar100-c": _cifar_c,
                "imagenet-c": _imagenet_c, "generated": _generated, "fashion-mnist-c": _fashion_mnist_c}
    if dataset not in builders:
        raise ConfigError(f"tta dataset '{dataset}' unknown: expected one of {', '.join(builders)}")
    from scenarios.datasets.registry import resolve_data_root

    return builders[dataset](cfg, resolve_data_root(data_root))


def _stream(cfg: dict, domains, tests: list, train, n_classes: int, input_shape, source: str, **extra) -> Stream:
    """Experiences from per-domain test sets (mixed: one shuffled experience over all of them)."""
    seed = int(cfg.get("corruption_seed", 0))
    classes = list(range(n_classes))
    if cfg.get("shuffle_within_domain"):  # mariodoebler shuffles within each domain with the run seed
        tests = [Subset(t, torch.randperm(len(t), generator=torch.Generator().manual_seed(seed + i)).tolist())
                 for i, t in enumerate(tests)]
    names = [f"{n}_{s}" for n, s in domains]
    if cfg.get("mixed"):  # mariodoebler's mixed_domains: all domains in one shuffled stream
        union = ConcatDataset(tests)
        perm = torch.randperm(len(union), generator=torch.Generator().manual_seed(seed)).tolist()
        exps = [Experience(0, train, Subset(union, perm), classes, "tta", domain="mixed",
                           meta={"domains": names})]
    else:
        starts = _order_starts(cfg)
        order = [sum(1 for s in starts if s <= i) - 1 for i in range(len(tests))] if starts else [0] * len(tests)
        exps = [Experience(i, train, t, classes, "tta", domain=names[i],
                           meta={"corruption": domains[i][0], "severity": domains[i][1], "order": order[i]})
                for i, t in enumerate(tests)]
    info = StreamInfo(name=cfg.get("name") or cfg.get("dataset"), kind="tta", n_classes=n_classes,
                      n_experiences=len(exps), class_order=classes, input_shape=tuple(input_shape),
                      classes_per_experience=[classes] * len(exps),
                      extra={"domains": [e.domain for e in exps], "corruption_source": source,
                             "reset_each_shift": bool(cfg.get("reset_each_shift", False)),
                             "gradual": cfg.get("gradual") or False, "mixed": bool(cfg.get("mixed", False)),
                             "order_starts": [] if cfg.get("mixed") else _order_starts(cfg),
                             "shuffle_within_domain": bool(cfg.get("shuffle_within_domain", False)), **extra})
    return Stream(exps, info, KIND.protocol)


def _fashion_mnist_c(cfg: dict, data_root: Path) -> Stream:
    from scenarios.datasets.fashion_mnist_c import build_fashion_mnist_c  # generated once, cached (scenarios/datasets/fashion_mnist_c.py)

    return build_fashion_mnist_c(cfg, data_root)


def _synthetic_c(cfg: dict, data_root: Path) -> Stream:
    from scenarios.datasets.synthetic import SYNTHETIC_C_DEFAULTS as DEFAULT_SYNTHETIC, synthetic_c_split as source_split

    params = {**DEFAULT_SYNTHETIC, **dict(cfg.get("synthetic") or {})}
    train, test = source_split(params)
    x = torch.as_tensor(test.images).float() / 255
    y = torch.as_tensor(test.targets).long()
    if cfg.get("limit_per_class"):
        keep = _limit(y, cfg["limit_per_class"], params["n_classes"])
        x, y = x[keep], y[keep]
    domains = _domains(cfg, GENERATED[:4])
    bad = [n for n, _ in domains if n not in GENERATED]
    if bad:
        raise ConfigError(f"synthetic-c cannot generate {sorted(set(bad))}; use corruptions from {list(GENERATED)}")
    seed = int(cfg.get("corruption_seed", 0))
    loaded = {}  # a recurring (corruption, severity) is the same images, as in the released sets
    for i, d in enumerate(domains):
        if d not in loaded:
            loaded[d] = TensorDataset(corrupt(x, d[0], d[1], torch.Generator().manual_seed(seed * 1000 + i)), y)
    tests = [loaded[d] for d in domains]
    return _stream(cfg, domains, tests, train, params["n_classes"], (3, params["image_size"], params["image_size"]),
                   "generated:clbench-torch")


def _cifar_c(cfg: dict, data_root: Path) -> Stream:
    from scenarios.datasets.cifar_c import load_cifar_c

    dataset = cfg["dataset"]
    n_classes = 10 if dataset == "cifar10-c" else 100
    domains = _domains(cfg)
    names = sorted({n for n, _ in domains})
    tests, loaded = [], {}
    for name, sev in domains:  # a (corruption, severity) that recurs (gradual, several orders) is read once
        if (name, sev) not in loaded:
            x, y = load_cifar_c(dataset, data_root, name, sev, cfg.get("n_examples"), names)
            if cfg.get("limit_per_class"):
                keep = _limit(y, cfg["limit_per_class"], n_classes)
                x, y = x[keep], y[keep]
            loaded[name, sev] = TensorDataset(x, y)
        tests.append(loaded[name, sev])
    train = _declared_source(cfg, data_root) or TensorDataset(torch.empty(0, 3, 32, 32, dtype=torch.uint8),
                                                              torch.empty(0, dtype=torch.long))
    return _stream(cfg, domains, tests, train, n_classes, (3, 32, 32), "released",
                   source_data=(cfg.get("source_data") or {}).get("dataset"))


def _declared_source(cfg: dict, data_root: Path):
    """`scenario.source_data: {dataset: cifar10, ...}`: that registered dataset's clean TRAIN split, offered as
    every experience's `train` (the declared source data of EcoTTA's warm-up and PSMT's Fisher); None if unset."""
    src = dict(cfg.get("source_data") or {})
    if not src:
        return None
    if "dataset" not in src:
        raise ConfigError("scenario.source_data needs a dataset (a registered clean dataset, e.g. {dataset: cifar10})")
    import scenarios  # noqa: F401  (registers the datasets)
    from scenarios.datasets.registry import get_loader

    return get_loader(src["dataset"])(src, data_root).train


def _imagenet_c(cfg: dict, data_root: Path) -> Stream:
    from scenarios.datasets.imagenet_c import ImageNetC

    domains = _domains(cfg)
    n = cfg.get("n_examples", 5000)
    loaded = {}
    for name, sev in dict.fromkeys(domains):  # each (corruption, severity) scanned once
        t = ImageNetC(data_root, name, sev, n, str(cfg.get("preprocess", "none")))
        if cfg.get("limit_per_class"):
            t = Subset(t, _limit(t.targets, cfg["limit_per_class"], t.n_classes).tolist())
        loaded[name, sev] = t
    tests = [loaded[d] for d in domains]
    train = _declared_source(cfg, data_root) or TensorDataset(torch.empty(0, 3, 224, 224, dtype=torch.uint8),
                                                              torch.empty(0, dtype=torch.long))
    return _stream(cfg, domains, tests, train, 1000, (3, 224, 224), "released",
                   source_data=(cfg.get("source_data") or {}).get("dataset"),
                   preprocess=str(cfg.get("preprocess", "none")), image_ids="robustbench-5000" if n and int(n) <= 5000 else "all")


def _generated(cfg: dict, data_root: Path) -> Stream:
    """A clean registered test set corrupted on the fly by `imagecorruptions` (labelled generated)."""
    try:
        from imagecorruptions import corrupt as ic_corrupt
    except ImportError:
        raise ConfigError("scenario.dataset=generated needs imagecorruptions: pip install -e .[tta] "
                          "(the imagecorruptions-imaug fork)") from None
    from scenarios.datasets.registry import get_loader

    clean = dict(cfg.get("clean") or {})
    if "dataset" not in clean:
        raise ConfigError("scenario.dataset=generated needs scenario.clean.dataset (a registered clean dataset)")
    data = get_loader(clean["dataset"])(clean, data_root)
    pairs = [data.test[i] for i in range(len(data.test))]
    x = torch.stack([torch.as_tensor(p[0]) for p in pairs])
    y = torch.as_tensor([int(p[1]) for p in pairs])
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    n_classes = int(y.max()) + 1
    if cfg.get("limit_per_class"):
        keep = _limit(y, cfg["limit_per_class"], n_classes)
        x, y = x[keep], y[keep]
    domains = _domains(cfg)
    seed = int(cfg.get("corruption_seed", 0))
    hwc = x.permute(0, 2, 3, 1).numpy()
    if hwc.shape[-1] == 1:
        hwc = np.repeat(hwc, 3, axis=-1)
    loaded = {}
    for i, (name, sev) in enumerate(domains):
        if (name, sev) in loaded:  # a recurring domain is the same images
            continue
        np.random.seed(seed * 1000 + i)  # imagecorruptions draws from numpy's global RNG
        out = np.stack([np.clip(ic_corrupt(img, corruption_name=name, severity=sev), 0, 255) for img in hwc])
        loaded[name, sev] = TensorDataset(torch.from_numpy(out.astype(np.uint8)).permute(0, 3, 1, 2).contiguous(), y)
    tests = [loaded[d] for d in domains]
    return _stream(cfg, domains, tests, data.train, n_classes, tuple(tests[0].tensors[0].shape[1:]),
                   "generated:imagecorruptions", clean_dataset=clean["dataset"])


KIND = Kind(
    name="tta", build=build_tta, protocol=EvalProtocol(loop="online"),
    metrics=km.tta, summary=km.tta_summary, score=km.tta_score, matrix_labels=km.domain_labels,
)

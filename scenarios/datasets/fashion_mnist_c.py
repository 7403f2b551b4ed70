"""Fashion-MNIST-C (generated): CoTTA's continual test-time adaptation protocol on real images, and its source model.

**The stream** (`scenario.dataset=fashion-mnist-c`, kind `tta`): the first `per_class` clean Fashion-MNIST TEST
images of each class (a subsample, so the cache builds inside CI's budget; `per_class: null` keeps all 10,000),
upsampled from 28 to 32 px (imagecorruptions refuses images under 32 px; bilinear), grey repeated to RGB,
corrupted by the `imagecorruptions` package (the maintained `imagecorruptions-imaug` fork, extra `tta`) with
ImageNet-C's constants: the 15 corruptions at `severity` (5) in CoTTA's fixed order. This is NOT a released
benchmark: the stream info says `corruption_source: generated:imagecorruptions` and no number here is comparable
with a paper's. The corrupted images are generated ONCE (a progress bar per domain; glass_blur first compiles
its numba kernel) and cached under `<data_root>/fashion-mnist-c-cache/` (key: every setting that changes the
pixels plus the package version; written atomically), so later runs read them in a second. Each domain's
corruption draws from numpy's RNG seeded with `corruption_seed * 1000 + i` (as `scenarios.kinds.tta._generated`).

**Its source model** (cl/app/testbeds/fashion_mnist_c.py; backbone source `fashion-mnist-c`, configs/backbone/fashion-mnist-c.yaml): EfficientNet-Lite0
with its ImageNet weights (cl/models/backbones_efficientnet.py) plus a linear head, fine-tuned end to end once on the
first `train_per_class` clean Fashion-MNIST TRAIN images of each class (the scenario's declared source data,
offered to strategies as every experience's `train`), then cached through `cl.engine.model_cache` (own RNG, atomic).
The backbone it returns is the whole classifier (`is_classifier`, logits over the 10 classes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cl.engine.errors import ConfigError

GENERATED_SIZE = 32  # imagecorruptions' minimum side
SOURCE_DEFAULTS = {"train_per_class": 100, "epochs": 2, "batch_size": 32, "lr": 1e-3, "seed": 0}


def _first_per_class(y: np.ndarray, n: int | None) -> np.ndarray:
    if n is None:
        return np.arange(len(y))
    return np.sort(np.concatenate([np.flatnonzero(y == c)[: int(n)] for c in range(10)]))


def _upsample(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, 1, 28, 28] -> uint8 [N, 3, 32, 32] (bilinear, antialiased; grey repeated)."""
    x = torch.as_tensor(images).float()
    x = F.interpolate(x, size=(GENERATED_SIZE, GENERATED_SIZE), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


def _imagecorruptions():
    try:
        from imagecorruptions import corrupt
    except ImportError:
        raise ConfigError("fashion-mnist-c generates its corruptions with imagecorruptions: pip install -e .[tta] "
                          "(the imagecorruptions-imaug fork)") from None
    from importlib import metadata

    try:
        version = metadata.version("imagecorruptions-imaug")
    except metadata.PackageNotFoundError:
        version = "?"
    return corrupt, version


def generated_domains(clean_x: torch.Tensor, domains: list[tuple[str, int]], seed: int, cache_dir: Path,
                      settings: Mapping[str, Any], progress: bool = True) -> dict[tuple[str, int], torch.Tensor]:
    """{(corruption, severity): uint8 [N, 3, 32, 32]}: read from the cache, or generated once and cached."""
    from cl.engine.model_cache import cache_file, load_weights, save_atomic

    corrupt, version = _imagecorruptions()
    unique = list(dict.fromkeys(domains))
    key_settings = {**dict(settings), "domains": [list(d) for d in unique], "corruption_seed": seed,
                    "imagecorruptions": version, "size": GENERATED_SIZE}
    path, _ = cache_file(cache_dir, "fashion-mnist-c", key_settings)
    if path.exists():
        stored = load_weights(path)
        return {d: stored[f"{d[0]}_{d[1]}"] for d in unique}
    from tqdm.auto import tqdm

    hwc = clean_x.permute(0, 2, 3, 1).numpy()
    out = {}
    state = np.random.get_state()  # imagecorruptions draws from numpy's global RNG: leave it as found
    try:
        for i, (name, sev) in enumerate(unique):
            np.random.seed(seed * 1000 + domains.index((name, sev)))
            bar = tqdm(hwc, desc=f"fashion-mnist-c: generating {name} (severity {sev}) once", unit="img",
                       disable=not progress, leave=False)
            images = np.stack([np.clip(corrupt(img, corruption_name=name, severity=sev), 0, 255) for img in bar])
            out[name, sev] = torch.from_numpy(np.rint(images).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    finally:
        np.random.set_state(state)
    save_atomic({f"{n}_{s}": v for (n, s), v in out.items()}, path)
    (path.parent / (path.stem + ".json")).write_text(json.dumps(key_settings, indent=1))
    return out


def build_fashion_mnist_c(cfg: dict, data_root: Path):
    """The tta stream (registered in scenarios.kinds.tta as dataset `fashion-mnist-c`)."""
    from torch.utils.data import TensorDataset

    from scenarios.datasets.fashion_mnist import load_fashion_mnist
    from scenarios.kinds.tta import _domains, _stream

    data = load_fashion_mnist(cfg, data_root)
    per_class = cfg.get("per_class", 50)
    test_idx = _first_per_class(data.test.targets, per_class)
    clean = _upsample(data.test.images[test_idx].numpy())
    y = torch.as_tensor(data.test.targets[test_idx]).long()
    domains = _domains(cfg)
    seed = int(cfg.get("corruption_seed", 0))
    cache_dir = Path(str(cfg.get("cache_dir") or data_root / "fashion-mnist-c-cache")).expanduser()
    corrupted = generated_domains(clean, domains, seed, cache_dir, {"per_class": per_class},
                                  progress=True)
    tests = [TensorDataset(corrupted[d], y) for d in domains]
    train_idx = _first_per_class(data.train.targets, cfg.get("source_per_class", SOURCE_DEFAULTS["train_per_class"]))
    train = TensorDataset(_upsample(data.train.images[train_idx].numpy()),
                          torch.as_tensor(data.train.targets[train_idx]).long())
    return _stream(cfg, domains, tests, train, 10, (3, GENERATED_SIZE, GENERATED_SIZE), "generated:imagecorruptions",
                   clean_dataset="fashion-mnist", per_class=per_class, source_data="fashion-mnist")

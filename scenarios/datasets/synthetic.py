"""Procedural images of any size: a dataset that needs no files, learnable in seconds, with optional domains.

Each class is a seeded pattern (an oriented colour grating plus a few colour blobs); each domain restyles every
image the same way (inversion, tint, contrast, offset, smoothing), so domain-IL shifts the input distribution
while keeping the classes. Every sample gets a small random shift and Gaussian noise.

`difficulty` (default 0: the images are exactly those of difficulty-free versions) adds per-sample nuisances that
carry no class information: a larger shift, a random contrast, colour gain and offset, and a random background
grating ("clutter"), each scaled by `difficulty`. A randomly initialised network's class means are dominated by
such nuisances; a network pre-trained to ignore them (cl/app/testbeds/vit_warmup.py, on classes no stream uses) is not.
So `difficulty` makes the pre-trained-model methods separate: see docs/tiny_vit.md for the measurement.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cl.engine.errors import ConfigError
from cl.engine.in_memory import TensorImageDataset

# Stream tags for the seeded generators, so patterns, styles and samples never share random numbers.
_PATTERN, _STYLE, _TRAIN, _TEST = 0, 1, 2, 3
# Tags 4 (cl.app.testbeds.xtail_warmup's pre-training renders) and 5, 6 (cl.app.testbeds.vit_warmup's pre-training class
# patterns and renders) are taken: no stream draws from them, which is what makes those pre-training sets disjoint.


def make_synthetic(
    n_classes: int = 10,
    n_domains: int = 1,
    image_size: int = 32,
    channels: int = 3,
    train_per_class: int = 60,
    test_per_class: int = 20,
    noise: float = 0.15,
    seed: int = 0,
    difficulty: float = 0.0,
) -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, test) uint8 [N, channels, image_size, image_size]; `*_per_class` counts are per domain.

    Both datasets carry `domains` (one domain id per sample); samples are shuffled so that the first samples
    of a class come from every domain. Deterministic for a given `seed`.
    """
    _validate(n_classes, n_domains, image_size, channels, train_per_class, test_per_class, noise, seed)
    if not 0 <= difficulty <= 2:
        raise ConfigError(f"synthetic: invalid difficulty={difficulty!r} (expected 0 <= difficulty <= 2; 0 = plain)")
    patterns = np.stack([_class_pattern(c, image_size, channels, seed) for c in range(n_classes)])
    styles = [_domain_style(d, channels, seed) for d in range(n_domains)]
    names = [f"class_{c}" for c in range(n_classes)]
    splits = []
    for tag, per_class in ((_TRAIN, train_per_class), (_TEST, test_per_class)):
        rng = np.random.default_rng([seed, tag])
        images, labels, domains = _render(patterns, styles, per_class, noise, rng, difficulty)
        splits.append(TensorImageDataset(images, labels, class_names=names, domains=domains))
    return splits[0], splits[1]


def _validate(n_classes, n_domains, image_size, channels, train_per_class, test_per_class, noise, seed) -> None:
    checks = {
        "n_classes": n_classes >= 1,
        "n_domains": n_domains >= 1,
        "image_size": image_size >= 4,
        "channels": channels >= 1,
        "train_per_class": train_per_class >= 1,
        "test_per_class": test_per_class >= 1,
        "noise": noise >= 0,
        "seed": seed >= 0,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        values = {"n_classes": n_classes, "n_domains": n_domains, "image_size": image_size, "channels": channels,
                  "train_per_class": train_per_class, "test_per_class": test_per_class, "noise": noise, "seed": seed}
        raise ConfigError(
            "synthetic: invalid " + ", ".join(f"{k}={values[k]!r}" for k in bad)
            + " (counts must be >= 1, image_size >= 4, noise and seed >= 0)"
        )


def _class_pattern(c: int, size: int, channels: int, seed: int, tag: int = _PATTERN) -> np.ndarray:
    """A [channels, size, size] pattern in [0.1, 0.9]: a low-frequency grating plus two blobs, each coloured.

    `tag` names the random stream; every scenario uses `_PATTERN`, pre-training sets their own tag."""
    rng = np.random.default_rng([seed, tag, c])
    v, u = np.meshgrid(np.linspace(0, 1, size, endpoint=False), np.linspace(0, 1, size, endpoint=False), indexing="ij")
    theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi)
    grating = 0.5 + 0.5 * np.cos(2 * np.pi * freq * (u * np.cos(theta) + v * np.sin(theta)) + phase)
    blobs = np.zeros((size, size))
    for _ in range(2):
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        sigma = rng.uniform(0.08, 0.15)
        blobs += np.exp(-((v - cy) ** 2 + (u - cx) ** 2) / (2 * sigma**2))
    grating_colour = rng.uniform(0.2, 1.0, size=channels)[:, None, None]
    blob_colour = rng.uniform(0.2, 1.0, size=channels)[:, None, None]
    pattern = 0.6 * grating_colour * grating + 0.8 * blob_colour * blobs
    pattern = (pattern - pattern.min()) / max(pattern.max() - pattern.min(), 1e-8)
    return (0.1 + 0.8 * pattern).astype(np.float32)


def _domain_style(d: int, channels: int, seed: int) -> dict:
    """Domain 0 is the plain images; others invert (odd d), tint, change contrast and offset, and may smooth."""
    if d == 0:
        return {"invert": False, "contrast": 1.0, "gain": np.ones(channels), "offset": np.zeros(channels),
                "smooth": False}
    rng = np.random.default_rng([seed, _STYLE, d])
    return {
        "invert": d % 2 == 1,
        "contrast": rng.uniform(0.5, 0.9),
        "gain": rng.uniform(0.5, 1.0, size=channels),
        "offset": rng.uniform(-0.15, 0.25, size=channels),
        "smooth": d % 3 == 2,
    }


def _apply_style(x: np.ndarray, style: dict) -> np.ndarray:
    if style["invert"]:
        x = 1.0 - x
    x = 0.5 + np.float32(style["contrast"]) * (x - 0.5)
    gain = style["gain"].astype(np.float32)[None, :, None, None]
    x = x * gain + style["offset"].astype(np.float32)[None, :, None, None]
    if style["smooth"]:
        x = _box_blur3(x)
    return x


def _box_blur3(x: np.ndarray) -> np.ndarray:
    """3x3 mean filter over the last two axes (edge-padded), vectorised over samples and channels."""
    padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[-2:]
    return sum(padded[..., i : i + h, j : j + w] for i in range(3) for j in range(3)) / np.float32(9.0)


def _nuisance(x: np.ndarray, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """Per-sample contrast, colour gain/offset and a background grating, each scaled by `difficulty` (in place)."""
    n, channels, size, _ = x.shape
    d = np.float32(difficulty)
    contrast = rng.uniform(1 - 0.5 * d, 1, size=(n, 1, 1, 1)).astype(np.float32)
    gain = rng.uniform(1 - 0.5 * d, 1 + 0.3 * d, size=(n, channels, 1, 1)).astype(np.float32)
    offset = rng.uniform(-0.2 * d, 0.2 * d, size=(n, channels, 1, 1)).astype(np.float32)
    theta, freq, phase = rng.uniform(0, np.pi, n), rng.uniform(1.0, 4.0, n), rng.uniform(0, 2 * np.pi, n)
    v, u = np.meshgrid(np.linspace(0, 1, size, endpoint=False), np.linspace(0, 1, size, endpoint=False), indexing="ij")
    arg = 2 * np.pi * freq[:, None, None] * (u * np.cos(theta)[:, None, None] + v * np.sin(theta)[:, None, None])
    clutter = (np.cos(arg + phase[:, None, None]) * 0.5).astype(np.float32)[:, None]  # [n, 1, S, S] in [-.5, .5]
    clutter_colour = rng.uniform(0, 1, size=(n, channels, 1, 1)).astype(np.float32)
    x = 0.5 + contrast * (x - 0.5)
    return x * gain + offset + 0.5 * d * clutter_colour * clutter


def _render(patterns: np.ndarray, styles: list[dict], per_class: int, noise: float, rng: np.random.Generator,
            difficulty: float = 0.0):
    """Shifted, styled, noisy copies of every pattern, `per_class` per (class, domain), in a shuffled order.

    With `difficulty` 0 the draws (and so the images) are exactly those of the plain stream."""
    n_classes, channels, size, _ = patterns.shape
    max_shift = max(1, size // 16) + int(round(difficulty * size / 16))
    labels = np.repeat(np.arange(n_classes), per_class)
    images, all_labels, all_domains = [], [], []
    for d, style in enumerate(styles):
        shifts = rng.integers(-max_shift, max_shift + 1, size=(len(labels), 2))
        x = np.empty((len(labels), channels, size, size), dtype=np.float32)
        for shift in np.unique(shifts, axis=0):  # one vectorised roll per distinct (dy, dx)
            chosen = np.flatnonzero((shifts == shift).all(axis=1))
            x[chosen] = np.roll(patterns[labels[chosen]], tuple(shift), axis=(-2, -1))
        x = _apply_style(x, style)
        if difficulty > 0:
            x = _nuisance(x, difficulty, rng)
        x += noise * rng.standard_normal(size=x.shape, dtype=np.float32)
        images.append(np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8))
        all_labels.append(labels)
        all_domains.append(np.full(len(labels), d, dtype=np.int64))
    perm = rng.permutation(len(labels) * len(styles))
    return (np.concatenate(images)[perm], np.concatenate(all_labels)[perm], np.concatenate(all_domains)[perm])


# synthetic-c: the clean split of the CTTA test bed (its source model: cl/app/testbeds/synthetic_c.py)
SYNTHETIC_C_DEFAULTS = {"n_classes": 10, "n_domains": 1, "image_size": 16, "channels": 3,
                     "train_per_class": 60, "test_per_class": 20, "noise": 0.15, "seed": 0}

def synthetic_c_split(synthetic: Mapping[str, Any] | None):
    """(clean train, clean test) of the synthetic-c scenario: train is the declared source data."""
    params = {**SYNTHETIC_C_DEFAULTS, **dict(synthetic or {})}
    params["n_domains"] = 1
    return make_synthetic(**params)

"""The "pre-trained" tiny ViT (`backbone=vit-tiny-pretrained`): vit-tiny trained once, supervised, on a procedural
PRE-TRAINING set whose classes no stream uses, and cached under the data root. Our stand-in for ImageNet
pre-training of the ViT-only methods (MOS, LAE, SEMA, CoSO, APER's adapter), not part of any paper.

Why: those methods exist to reuse a pre-trained representation; on a random vit-tiny they are compared on noise.
No real ViT weights can be had on these machines, so the project pre-trains its own: `n_classes` class patterns
drawn from `scenarios.datasets.synthetic`'s pattern family under a random-stream tag of their own (`PATTERN_TAG`; every
stream draws its class patterns under tag 0, so no pre-training class is a stream class), rendered under a tag of
their own too (`RENDER_TAG`; streams use 2 and 3), with the same per-sample nuisances that
`scenario.synthetic.difficulty` adds (shift, contrast, colour, clutter). The ViT learns features that ignore those
nuisances, which is what transfers to a `synthetic-hard` stream of new classes.

The cache (key, atomic write, own RNG) is cl/engine/model_cache.py, shared with clip-tiny-xtail's warm-up. By hand:

    .venv/bin/python -m cl.app.testbeds.vit_warmup OUT.safetensors
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cl.models.backbones import Backbone, build_timm
from cl.engine.errors import ConfigError
from cl.engine.model_cache import cache_file, cached_weights

PATTERN_TAG, RENDER_TAG = 5, 6  # scenarios.datasets.synthetic's random-stream tags: 0-3 streams, 4 xtail warm-up
DEFAULTS = {"n_classes": 64, "per_class": 40, "difficulty": 0.3, "noise": 0.15, "steps": 200, "batch_size": 32,
            "lr": 1e-3, "weight_decay": 0.05, "seed": 0, "clip_grad": 1.0}
MODEL_KEYS = ("arch", "kwargs", "in_chans", "input_size")


def pretrain_split(n_classes: int, per_class: int, image_size: int, channels: int, difficulty: float, noise: float,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [n_classes * per_class, C, S, S] and labels of the pre-training set (never a stream's)."""
    from scenarios.datasets.synthetic import _class_pattern, _domain_style, _render

    patterns = np.stack([_class_pattern(c, image_size, channels, seed, tag=PATTERN_TAG) for c in range(n_classes)])
    rng = np.random.default_rng([seed, RENDER_TAG])
    images, labels, _ = _render(patterns, [_domain_style(0, channels, seed)], per_class, noise, rng, difficulty)
    return torch.as_tensor(images), torch.as_tensor(labels).long()


def settings_of(cfg: Mapping[str, Any]) -> dict:
    """Everything the cached weights depend on (the cache key): the model and the warm-up, not where it lives."""
    import json

    warm = {**DEFAULTS, **{k: v for k, v in dict(cfg.get("warmup") or {}).items()
                           if k not in ("cache_dir", "progress")}}
    unknown = sorted(set(warm) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"backbone.warmup: unknown key(s) {unknown}: expected some of {sorted(DEFAULTS)}")
    model = {k: cfg.get(k) for k in MODEL_KEYS}
    return json.loads(json.dumps({"model": model, "warmup": warm}, default=lambda v: dict(v) if isinstance(v, Mapping) else list(v)))


def _timm_cfg(settings: Mapping[str, Any]) -> dict:
    return {**settings["model"], "source": "timm", "pretrained": False, "weights": None, "normalize": "none"}


def warm_up(settings: Mapping[str, Any], progress: bool = True, checkpoint=None) -> dict[str, torch.Tensor]:
    """The ViT's state dict after `steps` AdamW steps (cosine) of cross-entropy on the pre-training set.

    The caller (cl/model_cache.cached_weights) runs this under its own RNG. With a `checkpoint`
    (cl.engine.model_cache.BuildCheckpoint) the loop saves its state every few seconds and resumes from a saved one: the
    same weights as an uninterrupted build (model, optimiser, schedule, step and both RNGs are restored)."""
    from cl.engine.data import to_model_input
    from cl.engine.progress import progress_bar

    w = settings["warmup"]
    seed, steps, bs = int(w["seed"]), int(w["steps"]), int(w["batch_size"])
    torch.manual_seed(seed)
    backbone = build_timm(_timm_cfg(settings))
    size, chans = backbone.input_size, backbone.in_chans
    xs, ys = pretrain_split(int(w["n_classes"]), int(w["per_class"]), size, chans, float(w["difficulty"]),
                            float(w["noise"]), seed)
    head = torch.nn.Linear(backbone.feature_dim, int(w["n_classes"]))
    params = [*backbone.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=float(w["lr"]), weight_decay=float(w["weight_decay"]))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=float(w["lr"]), total_steps=max(1, steps), pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    first = 0
    saved = checkpoint.load() if checkpoint is not None else None
    if saved is not None:
        backbone.model.load_state_dict(saved["model"])
        head.load_state_dict(saved["head"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        g.set_state(saved["sampler_rng"])
        torch.set_rng_state(saved["torch_rng"])
        first = int(saved["step"])
    bar = progress_bar(steps, "pre-training vit-tiny (once; cached)", enabled=progress)
    bar.update(first)
    backbone.train()
    for step in range(first, steps):
        if checkpoint is not None and step > first and checkpoint.due():
            checkpoint.save({"step": step, "model": backbone.model.state_dict(), "head": head.state_dict(),
                             "opt": opt.state_dict(), "sched": sched.state_dict(), "sampler_rng": g.get_state(),
                             "torch_rng": torch.get_rng_state()})
        idx = torch.randint(len(ys), (bs,), generator=g)
        x = to_model_input(xs[idx], size, chans, torch.device("cpu"))
        loss = F.cross_entropy(head(backbone(x)), ys[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, float(w["clip_grad"]))
        opt.step()
        sched.step()
        bar.update()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return {k: v.detach().clone().contiguous() for k, v in backbone.model.state_dict().items()}


def cached_vit(cfg: Mapping[str, Any]):
    """(path, key) of the pre-trained ViT for this backbone config: trained only when the cache has no copy."""
    settings = settings_of(cfg)
    warm = dict(cfg.get("warmup") or {})
    cache_dir = warm.get("cache_dir") or "data/vit-warmup-cache"
    progress = bool(warm.get("progress", True))
    return cached_weights(cache_dir, "vit-tiny", settings,
                          lambda checkpoint: warm_up(settings, progress, checkpoint),
                          seed=int(settings["warmup"]["seed"]))


def cache_path(cfg: Mapping[str, Any]):
    """(file, key) the cache would use for this backbone config."""
    return cache_file((cfg.get("warmup") or {}).get("cache_dir") or "data/vit-warmup-cache", "vit-tiny",
                      settings_of(cfg))


def build_source(cfg: Mapping[str, Any]) -> Backbone:
    """Backbone source 'vit-warmup': the timm ViT of `cfg` with the cached pre-trained weights (or `weights:`)."""
    if cfg.get("weights"):
        return build_timm({**cfg, "source": "timm"})
    path, key = cached_vit(cfg)
    bb = build_timm({**cfg, "source": "timm", "weights": str(path), "pretrained": True})
    bb.weights_id = f"vit-warmup:{key}:{bb.weights_id}"
    return bb


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m cl.app.testbeds.vit_warmup OUT.safetensors")
    import time
    from pathlib import Path

    from cl.app.cli import compose_config
    from cl.engine.model_cache import isolated_rng, save_atomic

    cfg = compose_config(["backbone=vit-tiny-pretrained", "trainer.device=cpu"])["backbone"]
    start = time.perf_counter()
    with isolated_rng():
        state = warm_up(settings_of(cfg))
    print(save_atomic(state, Path(sys.argv[1])), f"{time.perf_counter() - start:.1f} s")

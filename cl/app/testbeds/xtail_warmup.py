"""The "pre-trained" tiny CLIP of `synthetic-xtail`: clip-tiny trained once, contrastively, on a PRE-TRAINING split
of the stream's concepts, and cached under the data root. Our stand-in for CLIP's pre-training, not part of MoRA.

Why: X-TAIL measures how a method keeps what a pre-trained CLIP already knows (zero-shot accuracy on datasets not
learned yet, and on the learned ones at the end). A randomly initialised CLIP knows nothing (its image features
collapse to one class), so on a random clip-tiny every method scores chance and no comparison means anything. Real
CLIP has seen most X-TAIL concepts during pre-training, on images other than the benchmark's; likewise this
module renders, for every class of every dataset of the stream, `per_class` images from the same class pattern
but from a random stream of their own (tag `PRETRAIN_TAG`; the stream's train and test images use
`scenarios.datasets.synthetic`'s tags 2 and 3), so the pre-training images are disjoint from the stream's train and test
images. It trains clip-tiny CLIP-style (symmetric image<->prompt cross-entropy, both towers, AdamW, cosine) and
saves the weights as a safetensors file keyed by every setting, written atomically, reused by every later run
(the cache mechanism is cl/engine/model_cache.py, shared with cl/app/testbeds/vit_warmup.py).

Backbone config `clip-tiny-xtail` (`warmup:` block) asks `cl/models/backbones_open_clip.py` for it; the cache build
takes a few seconds on a CPU. By hand:

    .venv/bin/python -m cl.app.testbeds.xtail_warmup OUT.safetensors [steps]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from cl.engine.errors import ConfigError
from cl.engine.model_cache import cache_file, cached_weights, save_atomic

PRETRAIN_TAG = 4  # scenarios.datasets.synthetic's random-stream tags: 0 pattern, 1 style, 2 train, 3 test
DEFAULTS = {"steps": 100, "batch_size": 64, "lr": 5e-4, "weight_decay": 0.1, "per_class": 40, "seed": 0, "clip_grad": 1.0,
            "style": 0, "noise": None, "prompt_template": "a photo of a {}."}
DATASET_KEYS = ("class_names", "image_size", "noise", "seed")


def pretrain_split(datasets: list[Mapping[str, Any]], per_class: int, style: int = 0,
                   noise: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, 3, S, S] and union labels: `per_class` fresh renders of every class of every dataset.

    `style` > 0 renders them in `scenarios.datasets.synthetic`'s domain style of that index (tint, contrast, smoothing,
    inversion for odd ones) and `noise` replaces the datasets' noise: a gap between "web" pre-training images and
    the benchmark's, so that zero-shot accuracy on the stream is good but not perfect."""
    from scenarios.datasets.synthetic import _class_pattern, _domain_style, _render  # the stream's own class patterns

    xs, ys, offset = [], [], 0
    for spec in datasets:
        if spec.get("source", "synthetic") != "synthetic":
            raise ConfigError("the xtail warm-up renders synthetic datasets only: for real datasets use "
                              "backbone=clip-vit-b16 (real CLIP weights)")
        n, size, seed = len(spec["class_names"]), int(spec.get("image_size", 32)), int(spec.get("seed", 0))
        patterns = np.stack([_class_pattern(c, size, 3, seed) for c in range(n)])
        rng = np.random.default_rng([seed, PRETRAIN_TAG])
        images, labels, _ = _render(patterns, [_domain_style(int(style), 3, seed)], int(per_class),
                                    float(spec.get("noise", 0.15) if noise is None else noise), rng)
        xs.append(torch.as_tensor(images))
        ys.append(torch.as_tensor(labels).long() + offset)
        offset += n
    if len({x.shape[-1] for x in xs}) > 1:
        raise ConfigError("the xtail warm-up needs one image_size for every dataset of the stream")
    return torch.cat(xs), torch.cat(ys)


def settings_of(model_cfg: Mapping[str, Any], warmup: Mapping[str, Any]) -> dict:
    """Everything the cached weights depend on (the cache key), as plain JSON-able values."""
    w = {**DEFAULTS, **{k: v for k, v in dict(warmup).items() if k not in ("cache_dir", "datasets")}}
    datasets = [{k: (list(d[k]) if k == "class_names" else d[k]) for k in DATASET_KEYS if k in d}
                for d in (warmup.get("datasets") or [])]
    if not datasets:
        raise ConfigError("backbone.warmup.datasets is empty: set it to the scenario's datasets "
                          "(${scenario.datasets}, as configs/backbone/clip-tiny-xtail.yaml does)")
    plain = json.loads(json.dumps({"model_cfg": model_cfg, "warmup": w, "datasets": datasets}, default=_plain))
    return plain


def _plain(v):
    if isinstance(v, Mapping):
        return dict(v)
    if isinstance(v, (list, tuple)) or hasattr(v, "__iter__"):
        return list(v)
    raise TypeError(type(v))


def warm_up(settings: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of the `model_cfg` CLIP after `steps` contrastive steps on the pre-training split.

    Runs under its own RNG (torch.random.fork_rng), so building the cache does not change the run that asks."""
    from cl.models.backbones_open_clip import build_open_clip
    from cl.engine.data import to_model_input

    w, datasets = settings["warmup"], settings["datasets"]
    seed, steps, bs = int(w["seed"]), int(w["steps"]), int(w["batch_size"])
    names = [n for d in datasets for n in d["class_names"]]
    prompts = [str(w["prompt_template"]).format(n) for n in names]
    xs, ys = pretrain_split(datasets, int(w["per_class"]), int(w["style"]), w["noise"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = build_open_clip({"model_cfg": settings["model_cfg"], "arch": "warmup", "normalize": "none",
                                    "input_size": int(xs.shape[-1])})
        clip = backbone.clip
        # the token embedding (49,408 x width) keeps its random init: the prompts use a few dozen of its rows and
        # its AdamW update alone would cost more than the rest of the step
        clip.token_embedding.requires_grad_(False)
        params = [p for p in clip.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=float(w["lr"]), weight_decay=float(w["weight_decay"]))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        g = torch.Generator().manual_seed(seed)
        classes = torch.arange(len(prompts))
        backbone.train()
        for _ in range(steps):
            idx = torch.randint(len(ys), (bs,), generator=g)
            x, y = to_model_input(xs[idx], backbone.input_size, 3, torch.device("cpu")), ys[idx]
            image = F.normalize(backbone(x).float(), dim=-1)
            text = F.normalize(backbone.encode_text(prompts).float(), dim=-1)
            logits = backbone.logit_scale * image @ text.T
            # symmetric CLIP loss over the class prompts: image -> its prompt; each prompt present -> its images
            same = (y.unsqueeze(0) == classes.unsqueeze(1)).float()
            present = same.sum(1) > 0
            target = same[present] / same[present].sum(1, keepdim=True)
            loss_t = -(target * F.log_softmax(logits.T[present], 1)).sum(1).mean()
            loss = F.cross_entropy(logits, y) + loss_t
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, float(w["clip_grad"]))
            opt.step()
            sched.step()
    return {k: v.detach().clone().contiguous() for k, v in clip.state_dict().items()}


def cache_path(model_cfg: Mapping[str, Any], warmup: Mapping[str, Any]) -> tuple[Path, str, dict]:
    """(file, key, settings): the key is a hash of every setting the weights depend on (not of `cache_dir`)."""
    settings = settings_of(model_cfg, warmup)
    path, key = cache_file(warmup.get("cache_dir") or "data/xtail-warmup-cache", "clip-xtail", settings)
    return path, key, settings


def cached_warm_weights(model_cfg: Mapping[str, Any], warmup: Mapping[str, Any]) -> tuple[Path, str]:
    """(path, key) of the warmed weights: trained only when `warmup.cache_dir` has no copy for these settings."""
    from cl.engine.model_cache import cached_weights  # the one trained-once cache (key, own RNG, atomic write)

    path, _, settings = cache_path(model_cfg, warmup)  # the same file name cached_weights derives
    return cached_weights(path.parent, "clip-xtail", settings, lambda: warm_up(settings),
                          seed=int(settings["warmup"]["seed"]))


def save(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    """Atomic write (cl/model_cache.save_atomic)."""
    return save_atomic(state, path)


def save_warm_clip(path: str | Path, steps: int = DEFAULTS["steps"]) -> Path:
    """The default synthetic-xtail warm-up with `steps` steps, written to `path` (for `backbone.weights=`)."""
    from cl.app.cli import compose_config

    cfg = compose_config(["scenario=synthetic-xtail", "trainer.device=cpu"])
    warmup = {**dict(cfg["backbone"].get("warmup") or {}), "steps": steps}
    return save(warm_up(settings_of(cfg["backbone"]["model_cfg"], warmup)), Path(path))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m cl.app.testbeds.xtail_warmup OUT.safetensors [steps]")
    torch.set_num_threads(2)
    print(save_warm_clip(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else DEFAULTS["steps"]))


def build_warm_open_clip(cfg: Mapping[str, Any]):
    """Backbone source 'open_clip' as the application registers it: open_clip, plus `backbone.warmup` weights made
    once by this test bed (`clip-tiny-xtail`)."""
    from cl.models.backbones_open_clip import build_open_clip

    return build_open_clip(cfg, warm_weights=cached_warm_weights)

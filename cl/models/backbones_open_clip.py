"""open_clip CLIP models as backbones: the image tower is `forward` (features), the text tower encodes prompts.

Why a source of its own: union-label scenarios (X-TAIL) classify over class names through text prompts, so a
strategy needs `encode_text(list_of_str)` and `logit_scale` besides image features. Weights come only from a
local file (`weights:`) or, for `pretrained: <tag>`, from open_clip's local cache; nothing is downloaded. A
`model_cfg:` mapping builds a custom (e.g. test-sized, random) CLIP through open_clip's own `CLIP` class; with a
`warmup:` mapping too, its weights are the cached contrastive warm-up of cl/app/testbeds/xtail_warmup.py (synthetic-xtail's
stand-in for CLIP pre-training), built on first use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cl.models.backbones import NORMALIZATIONS, Backbone, file_digest
from cl.engine.errors import BackboneError, ConfigError, MissingExtraError


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise MissingExtraError("backbone source 'open_clip' needs open_clip_torch: pip install -e '.[clip]'") from e
    return open_clip


class ClipBackbone(Backbone):
    """A Backbone whose features are CLIP image embeddings, with the text tower and tokenizer attached."""

    def __init__(self, clip: nn.Module, tokenizer, **kw):
        super().__init__(clip.visual, **kw)
        self.clip = clip
        self.tokenizer = tokenizer

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Unnormalised text embeddings [len(texts), embed_dim] (gradients flow when enabled)."""
        tokens = self.tokenizer(list(texts)).to(self.clip.logit_scale.device)
        return self.clip.encode_text(tokens)


def _load_file(model: nn.Module, path: Path, arch: str) -> str:
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist: set backbone.weights to a local open_clip "
                            f".pt/.bin/.safetensors file for '{arch}'")
    from cl.models.backbones import read_state_dict

    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or wrong:
        first = (missing or wrong)[0]
        raise BackboneError(f"weights file {path.name} does not match open_clip model '{arch}' "
                            f"(missing {len(missing)}, wrong shape {len(wrong)}, e.g. {first}): "
                            f"pick the backbone config that matches the file")
    model.load_state_dict({k: state[k] for k in own}, strict=True)
    return f"file:{path.name}:sha256:{file_digest(path)[:16]}"


def build_open_clip(cfg: Mapping[str, Any], warm_weights=None) -> ClipBackbone:
    """Builds `cfg.arch` (an open_clip model name) or `cfg.model_cfg` (a custom config), weights local only.

    `warm_weights(model_cfg, warmup) -> (path, key)` provides `cfg.warmup`'s weights; the application layer passes
    the test bed's (cl/app/testbeds/xtail_warmup.py), which this layer may not import."""
    oc = _open_clip()
    normalize = cfg.get("normalize", "clip")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown backbone.normalize '{normalize}': expected one of {tuple(NORMALIZATIONS)}")
    arch = str(cfg.get("arch"))
    model_cfg = cfg.get("model_cfg")
    weights, pretrained = cfg.get("weights"), cfg.get("pretrained", False)
    if model_cfg:
        model = oc.CLIP(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(model_cfg).items()})
        weights_id = "random-init"
        if not weights and cfg.get("warmup"):  # a tiny CLIP "pre-trained" once on a synthetic stream's concepts
            if warm_weights is None:
                raise ConfigError("backbone.warmup needs the test bed's warm-up (cl/app/testbeds/xtail_warmup.py): "
                                  "build the backbone through cl.app.registry.build_backbone")
            path, key = warm_weights(model_cfg, cfg["warmup"])
            weights_id = f"xtail-warmup:{key}:" + _load_file(model, path, arch)
        elif weights:
            weights_id = _load_file(model, Path(str(weights)).expanduser(), arch)
    else:
        if oc.get_model_config(arch) is None:
            raise ConfigError(f"unknown open_clip model '{arch}': expected one of open_clip.list_models()")
        path = Path(str(weights)).expanduser() if weights else None
        if path is None and pretrained:  # find the local file before building a large model
            tag = str(pretrained)
            cache = Path(cfg.get("cache_dir") or Path.home() / ".cache" / "open_clip")
            found = sorted(cache.glob(f"**/*{tag}*")) if cache.is_dir() else []
            files = [f for f in found if f.is_file() and f.suffix in (".pt", ".bin", ".safetensors")]
            if not files:
                raise BackboneError(f"no local weights for open_clip '{arch}' pretrained '{tag}' under {cache}: "
                                    f"set backbone.weights=/path/to/{arch}-{tag}.pt (nothing is downloaded)")
            path = files[0]
        model = oc.create_model(arch, pretrained=None)
        weights_id = _load_file(model, path, arch) if path is not None else "random-init"
    tokenizer = oc.get_tokenizer(arch) if not model_cfg else oc.SimpleTokenizer(
        context_length=int(dict(model_cfg)["text_cfg"].get("context_length", 77)))
    vis = model.visual
    return ClipBackbone(model, tokenizer, name=str(cfg.get("name", arch)), arch=arch,
                        feature_dim=int(getattr(vis, "output_dim")), input_size=int(cfg["input_size"]),
                        in_chans=3, normalize=normalize, weights_id=weights_id,
                        pretrained=weights_id != "random-init")

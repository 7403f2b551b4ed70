"""The RobustBench source classifiers of continual test-time adaptation (`source: robustbench`, docs/tta.md).

CTTA adapts a source CLASSIFIER (logits out, `backbone.is_classifier`), trained on clean data and taken from
RobustBench's `corruptions` model zoo:

    cifar10  `Standard`                    WRN-28-10 (pre-activation WideResNet, TRADES layout), no normalisation
    cifar100 `Hendrycks2020AugMix_WRN`     WRN-40-2 AugMix (EcoTTA's CIFAR100-C model), mean/std 0.5 inside
    cifar100 `Hendrycks2020AugMix_ResNeXt` ResNeXt-29 32x4d (CifarResNeXt), mean/std 0.5 inside the model
    imagenet `Standard_R50`                torchvision ResNet-50 (IMAGENET1K_V1 weights), ImageNet mean/std

Written here from the architecture descriptions (RobustBench model_zoo/architectures wide_resnet.py and
resnext.py were read for the exact structure and key names; nothing copied), so a RobustBench checkpoint
loads with `strict=True`. Normalisation is the `Backbone`'s (`normalize: none|inception|imagenet`): the
`mu`/`sigma` (ResNeXt) and `normalize.mean`/`normalize.std` (ResNet-50 wrapped by `normalize_model`) buffers of
a checkpoint are checked against it and dropped.

Each model exposes `stem(x)`, `blocks()` (its residual blocks in order) and `head(x)`, and `ecotta_partitions`
(blocks per part for K = 4 / 5 meta networks: WRN-40 from the EcoTTA authors' sample code; WRN-28 and
ResNet-50 from Lily-Le/EcoTTA's ports of it, which cite the paper's Table 13; not checked against the table). One departure: the final pooling is adaptive, equal
to the reference's `avg_pool2d(8)` at 32 px, so the CIFAR models also run at test size (16 px).

Weights: `<model_dir>/<cifar10|cifar100|imagenet>/corruptions/<Name>.pt` (RobustBench's layout, read by
`robustbench_state_dict` below), or `weights:` (a file, e.g. torchvision's resnet50-0676ba61.pth),
or `pretrained: false` (random init, said so in `weights_id`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl.models.backbones import NORMALIZATIONS, Backbone, file_digest, read_state_dict
from cl.engine.errors import BackboneError, ConfigError


def _reference_init(model: nn.Module, linear_weight: bool = False) -> None:
    """The RobustBench definitions' init: convs He normal on fan-out, BN weight 1 / bias 0, linear bias 0 (and the
    linear weight He normal where the definition does so). Only matters without a checkpoint (tests, memory)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_weight:
                nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


# --- WideResNet (RobustBench `Standard`, TRADES layout) --------------------------------------------------------

class WRNBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, identity or 1x1 `convShortcut` on the
    activated input when the width or stride changes (then the activation is shared by both paths)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.equal = cin == cout
        self.convShortcut = None if self.equal else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(a))))
        return out + (x if self.equal else self.convShortcut(a))


class WRNGroup(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k: conv1, three groups of (depth-4)/6 blocks at 16k/32k/64k channels, BN-ReLU, pool, fc."""

    PARTITIONS = {28: {4: [2, 2, 4, 4], 5: [2, 2, 2, 2, 4]}, 40: {4: [3, 3, 6, 6], 5: [3, 3, 3, 3, 6]}}

    def __init__(self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ConfigError(f"WideResNet depth must be 6n+4 (28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, w[0], 3, 1, 1, bias=False)
        self.block1 = WRNGroup(n, w[0], w[1], 1)
        self.block2 = WRNGroup(n, w[1], w[2], 2)
        self.block3 = WRNGroup(n, w[2], w[3], 2)
        self.bn1 = nn.BatchNorm2d(w[3])
        self.fc = nn.Linear(w[3], num_classes)
        self.ecotta_partitions = self.PARTITIONS.get(depth, {})
        _reference_init(self)  # He normal on fan-out, BN 1/0, fc bias 0

    def stem(self, x):
        return self.conv1(x)

    def blocks(self) -> list[nn.Module]:
        return [*self.block1.layer, *self.block2.layer, *self.block3.layer]

    def head(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(x)), 1).flatten(1))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks():
            h = b(h)
        return self.head(h)


# --- ResNeXt-29 (RobustBench `Hendrycks2020AugMix_ResNeXt`, CifarResNeXt) -------------------------------------
class ResNeXtBlock(nn.Module):
    """Bottleneck type C: 1x1 reduce to D*C, grouped 3x3 (C groups, stride), 1x1 expand to 4*planes; ReLU after
    the sum; 1x1 conv + BN `downsample` when the shape changes. D = floor(planes * base_width / 64)."""

    def __init__(self, cin: int, planes: int, cardinality: int, base_width: int, stride: int = 1):
        super().__init__()
        inner = (planes * base_width // 64) * cardinality
        self.conv_reduce = nn.Conv2d(cin, inner, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(inner)
        self.conv_conv = nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(inner)
        self.conv_expand = nn.Conv2d(inner, planes * 4, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * 4)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
                           if stride != 1 or cin != planes * 4 else None)

    def forward(self, x):
        h = F.relu(self.bn_reduce(self.conv_reduce(x)))
        h = F.relu(self.bn(self.conv_conv(h)))
        h = self.bn_expand(self.conv_expand(h))
        return F.relu(h + (x if self.downsample is None else self.downsample(x)))


class CifarResNeXt(nn.Module):
    """ResNeXt-depth (C x Dd): 3x3 conv 64 + BN-ReLU, three stages of (depth-2)/9 bottlenecks (planes 64/128/256,
    strides 1/2/2), pool, `classifier`."""

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 9:
            raise ConfigError(f"ResNeXt depth must be 9n+2 (29, 38, ...), got {depth}")
        n = (depth - 2) // 9
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, stride) in enumerate(((64, 1), (128, 2), (256, 2)), start=1):
            blocks = []
            for j in range(n):
                blocks.append(ResNeXtBlock(cin, planes, cardinality, base_width, stride if j == 0 else 1))
                cin = planes * 4
            setattr(self, f"stage_{i}", nn.Sequential(*blocks))
        self.classifier = nn.Linear(cin, num_classes)
        # EcoTTA has no ResNeXt-29 setting; three blocks per part is the stage split (K=3), one per block K=9.
        self.ecotta_partitions = {3: [n, n, n], 9: [1] * (3 * n)}
        _reference_init(self, linear_weight=True)  # CifarResNeXt also draws its classifier He normal

    def stem(self, x):
        return F.relu(self.bn_1(self.conv_1_3x3(x)))

    def blocks(self) -> list[nn.Module]:
        return [*self.stage_1, *self.stage_2, *self.stage_3]

    def head(self, x):
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks():
            h = b(h)
        return self.head(h)


# --- ResNet-50 (RobustBench `Standard_R50` = torchvision resnet50 V1) ---------------------------------------
def _resnet50(num_classes: int = 1000) -> nn.Module:
    from torchvision.models.resnet import Bottleneck, ResNet

    class ResNet50(ResNet):
        """torchvision's ResNet-50 (its key names are the checkpoint's) with the stem/blocks/head split."""

        def __init__(self):
            super().__init__(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)
            self.ecotta_partitions = {4: [3, 3, 5, 5], 5: [2, 2, 4, 4, 4]}

        def stem(self, x):
            return self.maxpool(self.relu(self.bn1(self.conv1(x))))

        def blocks(self):
            return [*self.layer1, *self.layer2, *self.layer3, *self.layer4]

        def head(self, x):
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return ResNet50()


# name -> (dataset folder, builder(cfg), normalize, n_classes, input size)
ARCHS = {
    "wrn-28-10": lambda c: WideResNet(int(c.get("depth", 28)), int(c.get("widen_factor", 10)), int(c["n_classes"])),
    "wrn-40-2": lambda c: WideResNet(int(c.get("depth", 40)), int(c.get("widen_factor", 2)), int(c["n_classes"])),
    "resnext-29-32x4d": lambda c: CifarResNeXt(int(c.get("depth", 29)), int(c.get("cardinality", 4)),
                                               int(c.get("base_width", 32)), int(c["n_classes"])),
    "resnet50": lambda c: _resnet50(int(c["n_classes"])),
}
# Buffers a RobustBench checkpoint carries for its input normalisation (checked against `normalize`, dropped).
NORMALIZER_KEYS = {"mu": "mean", "sigma": "std", "normalize.mean": "mean", "normalize.std": "std"}


def strip_normalizer(state: dict, normalize: str, where: str) -> dict:
    """The state without its normaliser buffers, after checking they are the Backbone's `normalize` statistics."""
    stats = NORMALIZATIONS[normalize]
    mean, std = stats if stats else ((0.0,) * 3, (1.0,) * 3)
    out = {}
    for k, v in state.items():
        if k in NORMALIZER_KEYS:
            want = torch.tensor(mean if NORMALIZER_KEYS[k] == "mean" else std)
            if v.numel() != want.numel() or not torch.allclose(v.flatten().float(), want, atol=1e-4):
                raise BackboneError(f"{where}: its input normalisation {k}={v.flatten().tolist()} is not "
                                    f"backbone.normalize={normalize} {want.tolist()}: set backbone.normalize to match")
            continue
        out[k] = v
    return out


def load_checked(model: nn.Module, state: dict, arch: str, where: str) -> None:
    """strict load, or ONE line naming what differs and the fix."""
    own = model.state_dict()
    # checkpoints saved before PyTorch 0.4.1 have no BN `num_batches_tracked` (unused in eval): keep ours
    state = {**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label} {len(keys)} (e.g. {keys[0]})" for label, keys in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        raise BackboneError(f"{where} does not match architecture '{arch}' ({detail}): pick the backbone config "
                            f"made for this checkpoint (configs/backbone/wrn28-10-standard.yaml, wrn40-2-augmix.yaml, "
                            f"resnext29-augmix.yaml, resnet50-standard.yaml) or the checkpoint made for '{arch}'")
    model.load_state_dict(state, strict=True)


ROBUSTBENCH_DATASETS = {"cifar10-c": "cifar10", "cifar100-c": "cifar100", "imagenet-c": "imagenet"}


def robustbench_state_dict(model_dir, dataset: str, model_name: str, threat_model: str = "corruptions") -> dict:
    """The state dict of a RobustBench checkpoint in RobustBench's file layout, read without robustbench:

        <model_dir>/<cifar10|cifar100|imagenet>/<threat_model>/<model_name>.pt

    A checkpoint holds either {'state_dict': ...} or the state dict itself; the 'module.' (DataParallel) and
    'model.' prefixes are stripped, as robustbench.utils.load_model does. (ImageNet 'Standard_R50' has no file
    in RobustBench: it is torchvision's resnet50 IMAGENET1K_V1 weights.)"""
    folder = ROBUSTBENCH_DATASETS.get(dataset, dataset)
    path = Path(model_dir) / folder / threat_model / f"{model_name}.pt"
    if not path.is_file():
        raise ConfigError(f"RobustBench checkpoint {path} not found: expected the layout "
                          f"<model_dir>/<cifar10|cifar100|imagenet>/{threat_model}/<ModelName>.pt, e.g. "
                          f"{Path(model_dir) / 'cifar10' / 'corruptions' / 'Standard.pt'} (robustbench.utils.load_model "
                          "downloads there; copy the file from a machine that has it"
                          + ("; for Standard_R50 set backbone.weights to torchvision's resnet50-0676ba61.pth instead)"
                             if model_name == "Standard_R50" else ")"))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"{path}: not a RobustBench checkpoint (a state dict, or a dict with 'state_dict')")
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "model."):
            k = k.replace(prefix, "")
        out[k] = v
    return out


def build_robustbench(cfg: Mapping[str, Any]) -> Backbone:
    """Backbone source 'robustbench': the source classifier (logits out) with RobustBench weights."""
    arch = str(cfg["arch"])
    if arch not in ARCHS:
        raise ConfigError(f"unknown robustbench arch '{arch}': expected one of {tuple(ARCHS)}")
    normalize = str(cfg.get("normalize", "none"))
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"unknown backbone.normalize '{normalize}': expected one of {tuple(NORMALIZATIONS)}")
    model = ARCHS[arch](cfg)
    name = str(cfg.get("robustbench_name", ""))
    if cfg.get("weights"):
        path = Path(str(cfg["weights"])).expanduser()
        if not path.is_file():
            raise BackboneError(f"weights file {path} does not exist: set backbone.weights to a local checkpoint "
                                "or null to read <model_dir>/<dataset>/corruptions/<Name>.pt")
        state = {k.removeprefix("model."): v for k, v in read_state_dict(path).items()}
        where, weights_id = f"weights file {path.name}", f"file:{path.name}:sha256:{file_digest(path)[:16]}"
    elif cfg.get("pretrained", True):
        state = robustbench_state_dict(cfg["model_dir"], str(cfg["dataset"]), name)
        where = f"RobustBench checkpoint {cfg['dataset']}/corruptions/{name}.pt"
        weights_id = f"robustbench:{cfg['dataset']}/corruptions/{name}"
    else:
        state, where, weights_id = None, "", "random-init (pretrained: false)"
    if state is not None:
        load_checked(model, strip_normalizer(state, normalize, where), arch, where)
    model.eval()
    bb = Backbone(model, name=str(cfg.get("name", arch)), arch=arch, feature_dim=int(cfg["n_classes"]),
                  input_size=int(cfg["input_size"]), in_chans=3, normalize=normalize, weights_id=weights_id,
                  pretrained=state is not None)
    bb.is_classifier = True
    return bb

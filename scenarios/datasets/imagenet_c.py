"""ImageNet-C from its released folder tree (Hendrycks & Dietterich; Zenodo 2235448), RobustBench's 5,000 images.

Layout:  <data_root>/ImageNet-C/<corruption>/<severity>/<wnid>/<ILSVRC2012_val_XXXXXXXX>.JPEG   (224 x 224)

The class index is the wnid's position among the sorted wnid folders (torchvision ImageFolder / RobustBench
`CustomImageFolder`). By default only the 5,000 images of RobustBench's fixed list
`robustbench/helper_files/imagenet_test_image_ids.txt` are used (shipped as scenarios/datasets/data/, see its README);
`n_examples: 50000` takes every image. Preprocessing is recorded in the stream info: `none` (mariodoebler: the
released 224 px images as they are) or `Res256Crop224` (CoTTA / RobustBench: resize 256, centre crop 224).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.engine.errors import ConfigError

ID_LIST = Path(__file__).parent / "data" / "imagenet_test_image_ids.txt"
SOURCE = "https://zenodo.org/record/2235448 (one tar per corruption family)"


def robustbench_ids() -> list[str]:
    """The 5,000 '<wnid>/<file>' entries of RobustBench's ImageNet test list, in its order."""
    return [line.strip() for line in ID_LIST.read_text().splitlines() if line.strip()]


def expected_tree(root: Path, corruption: str, severity: int) -> str:
    base = Path(root) / "ImageNet-C"
    return (f"expected the ImageNet-C tree {base}/<corruption>/<severity>/<wnid>/<image>.JPEG, e.g. "
            f"{base / corruption / str(severity) / 'n01440764' / 'ILSVRC2012_val_00000293.JPEG'} "
            f"(1000 wnid folders, 50 images each); from {SOURCE}, extracted under data_root ({root})")


class ImageNetC(Dataset):
    """uint8 [3, 224, 224] images of one corruption and severity, decoded on access; targets as a tensor."""

    def __init__(self, root: Path, corruption: str, severity: int, n_examples: int | None = 5000,
                 preprocess: str = "none"):
        folder = Path(root) / "ImageNet-C" / corruption / str(int(severity))
        if not folder.is_dir():
            raise ConfigError(f"imagenet-c: missing {folder}; " + expected_tree(root, corruption, severity))
        wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
        if not wnids:
            raise ConfigError(f"imagenet-c: {folder} has no class folders; " + expected_tree(root, corruption, severity))
        index = {w: i for i, w in enumerate(wnids)}
        if n_examples is not None and int(n_examples) <= 5000:
            entries = robustbench_ids()[: int(n_examples)]
            missing = [e for e in entries if not (folder / e).is_file()]
            if missing:
                raise ConfigError(f"imagenet-c: {len(missing)} of RobustBench's {len(entries)} listed images are "
                                  f"missing under {folder} (first: {missing[0]}); "
                                  + expected_tree(root, corruption, severity))
        else:
            entries = [f"{w}/{f.name}" for w in wnids for f in sorted((folder / w).iterdir()) if f.is_file()]
        if preprocess not in ("none", "Res256Crop224"):
            raise ConfigError(f"imagenet-c: preprocess must be none or Res256Crop224, got {preprocess!r}")
        self.folder, self.entries, self.preprocess = folder, entries, preprocess
        self.targets = torch.tensor([index[e.split("/")[0]] for e in entries], dtype=torch.long)
        self.n_classes = len(wnids)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.folder / self.entries[i]) as im:
            im = im.convert("RGB")
            if self.preprocess == "Res256Crop224":
                w, h = im.size
                s = 256 / min(w, h)
                im = im.resize((round(w * s), round(h * s)), Image.BILINEAR)
                w, h = im.size
                left, top = (w - 224) // 2, (h - 224) // 2
                im = im.crop((left, top, left + 224, top + 224))
            x = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
        return x, self.targets[i]

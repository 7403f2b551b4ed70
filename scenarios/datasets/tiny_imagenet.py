"""Tiny-ImageNet (200 classes, 64 px) from the official `tiny-imagenet-200/` archive, for Split Tiny-ImageNet
(SparCL's second benchmark; the SparCL repository itself has no Tiny-ImageNet loader, mammoth's seq-tinyimg uses
the same images).

Layout (http://cs231n.stanford.edu/tiny-imagenet-200.zip, extracted):

    <root>/tiny-imagenet-200/wnids.txt                      (200 WordNet ids, one a line)
                             train/<wnid>/images/*.JPEG      (500 per class)
                             val/images/*.JPEG               (10000, flat: not an ImageFolder tree)
                             val/val_annotations.txt         (tab-separated: file name, wnid, bounding box)

The val split is the test split (its labels are public; the official test split has none). Classes are the
sorted wnids (torchvision ImageFolder's order over train/), so label ids do not depend on wnids.txt's line order.
Images are decoded on access (PIL, RGB: a few are greyscale) into uint8 [3, 64, 64] tensors; `crop_flip` is
mammoth's seq-tinyimg training transform (RandomCrop(64, padding=4) + flip).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cl.engine.errors import ConfigError, DatasetError
from scenarios.datasets.cifar10 import SMALL_AUGMENTS, crop_flip

TINY_FOLDER = "tiny-imagenet-200"
TINY_CLASSES = 200
TINY_SIZE = 64
TINY_DOWNLOAD = ("on a machine with internet, download http://cs231n.stanford.edu/tiny-imagenet-200.zip and "
                 "unzip it into <root> (it creates <root>/tiny-imagenet-200/)")


class PathImageDataset(Dataset):
    """`(x, y)` from image files, decoded on access to uint8 [3, size, size] (resized only if a file differs)."""

    def __init__(self, paths: list[str], targets, class_names: list[str], train: bool = True,
                 augment: str = "none", size: int = TINY_SIZE, pad: int = 4):
        if augment not in SMALL_AUGMENTS:
            raise ConfigError(f"augment={augment!r} is not supported here; use one of {', '.join(SMALL_AUGMENTS)}")
        self.paths = list(paths)
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        self.class_names = list(class_names)
        self.train, self.augment, self.size, self.pad = bool(train), augment, int(size), int(pad)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.size, self.size)

    def eval_view(self) -> "PathImageDataset":
        return self if not self.train else PathImageDataset(self.paths, self.targets, self.class_names, False,
                                                            "none", self.size, self.pad)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            with Image.open(self.paths[i]) as img:
                img = img.convert("RGB")
                if img.size != (self.size, self.size):
                    img = img.resize((self.size, self.size), Image.BILINEAR)
                x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
        except OSError as e:
            raise DatasetError(f"{self.paths[i]}: unreadable image ({e}); the copy is damaged: extract "
                               f"{TINY_FOLDER} again") from None
        if self.train and self.augment == "crop_flip":
            x = crop_flip(x, self.pad)
        return x, int(self.targets[i])


def tiny_imagenet_tree(folder: Path) -> str:
    return "\n".join([
        "expected layout (the official tiny-imagenet-200.zip, extracted):",
        f"  {folder.parent}/",
        f"    {TINY_FOLDER}/",
        "      train/<wnid>/images/*.JPEG      (200 class folders)",
        "      val/images/*.JPEG",
        "      val/val_annotations.txt         (file name <tab> wnid <tab> box)",
        f"  where to get it: {TINY_DOWNLOAD}",
    ])


def find_tiny_folder(root: str | Path) -> Path:
    root = Path(root).absolute()
    if not (root / TINY_FOLDER).is_dir() and (root / "train").is_dir() and (root / "val").is_dir():
        return root
    return root / TINY_FOLDER


def read_tiny_imagenet(root: str | Path, augment: str = "none", name: str = "tiny-imagenet",
                       expected_classes: int | None = TINY_CLASSES) -> tuple[PathImageDataset, PathImageDataset]:
    """(train, test = val) from `root/tiny-imagenet-200/`; `DatasetError` with the expected tree when the layout
    is wrong. `expected_classes=None` accepts any class count (tests build tiny trees)."""
    if augment not in SMALL_AUGMENTS:
        raise ConfigError(f"{name}: augment={augment!r} is not supported; use one of {', '.join(SMALL_AUGMENTS)}")
    folder = find_tiny_folder(root)
    tree = tiny_imagenet_tree(folder)
    train_dir, val_dir = folder / "train", folder / "val"
    ann = val_dir / "val_annotations.txt"
    for need in (train_dir, val_dir / "images"):
        if not need.is_dir():
            raise DatasetError(f"{name}: {need} not found\n{tree}")
    if not ann.is_file():
        raise DatasetError(f"{name}: {ann} not found\n{tree}")
    wnids = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if expected_classes is not None and len(wnids) != expected_classes:
        raise DatasetError(f"{name}: {train_dir} has {len(wnids)} class folders, expected {expected_classes}\n{tree}")
    label = {w: i for i, w in enumerate(wnids)}
    paths, targets = [], []
    for w in wnids:
        files = sorted(p for p in (train_dir / w / "images").glob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        if not files:
            raise DatasetError(f"{name}: {train_dir / w / 'images'} has no images\n{tree}")
        paths += [str(p) for p in files]
        targets += [label[w]] * len(files)
    val_paths, val_targets = [], []
    for n, line in enumerate(ann.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label:
            raise DatasetError(f"{name}: {ann} line {n}: expected '<file>\\t<wnid>\\t...' with a wnid of train/, "
                               f"got {line[:80]!r}\n{tree}")
        path = val_dir / "images" / fields[0]
        if not path.is_file():
            raise DatasetError(f"{name}: {ann} line {n} names {fields[0]}, which is not in {val_dir / 'images'}\n{tree}")
        val_paths.append(str(path))
        val_targets.append(label[fields[1]])
    if not val_paths:
        raise DatasetError(f"{name}: {ann} lists no images\n{tree}")
    return (PathImageDataset(paths, targets, wnids, train=True, augment=augment),
            PathImageDataset(val_paths, val_targets, wnids, train=False))


def load_tiny_imagenet(cfg: dict, data_root: Path):
    """Registered as dataset `tiny-imagenet`: <root>/tiny-imagenet-200/, root = scenario.root or the data root."""
    from scenarios.datasets.benchmarks import _root
    from scenarios.config import get_str
    from scenarios.datasets.registry import LoadedData

    name = cfg.get("name") or "tiny-imagenet"
    root, hint = _root(cfg, data_root, ".")
    n = cfg.get("n_classes", TINY_CLASSES)
    try:
        train, test = read_tiny_imagenet(root, augment=get_str(cfg, "augment", "none"), name=name,
                                         expected_classes=None if n is None else int(n))
    except DatasetError as e:
        missing = not (root / TINY_FOLDER).is_dir()
        raise DatasetError(str(e) + (hint if hint and missing else "")) from None
    return LoadedData(train, test)


def _register() -> None:
    from scenarios.datasets.registry import DATASETS, register_dataset

    if "tiny-imagenet" not in DATASETS:
        register_dataset("tiny-imagenet")(load_tiny_imagenet)


_register()

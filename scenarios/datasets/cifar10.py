"""CIFAR-10 from torchvision's on-disk copy (`cifar-10-batches-py/`), read without running pickle code; and the
32 px image datasets SparCL / DER++ train on (Split CIFAR-10, Split Tiny-ImageNet: `scenarios/datasets/tiny_imagenet.py`).

Layout (what `torchvision.datasets.CIFAR10(root, download=True)` writes, the tarball from
https://www.cs.toronto.edu/~kriz/cifar.html extracted):

    <root>/cifar-10-batches-py/data_batch_1 ... data_batch_5   (pickles: 10000 images each, 'data', 'labels')
                               test_batch                      (pickle: 10000 images)
                               batches.meta                    (pickle: 'label_names', 10 names)

The pickles are read by `scenarios.datasets.cifar.safe_load` (numpy array reconstruction only). Images stay in memory as
one uint8 [N, 3, 32, 32] tensor at their native size: SparCL's ResNet-18 (mammoth's) runs on 32 px inputs, so
there is no resize. `augment="crop_flip"` is mammoth's seq-cifar10 training transform (RandomCrop(32, padding=4)
and a horizontal flip); `none` returns the stored pixels (the default: the strategies' buffers store the
non-augmented input, and the trainer's loader is what this dataset feeds).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.engine.errors import ConfigError, DatasetError
from scenarios.datasets.cifar import _as_dict, _field, _text, safe_load

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch", "batches.meta")
CIFAR10_CLASSES = 10
SMALL_AUGMENTS = ("none", "crop_flip")
CIFAR10_DOWNLOAD = (
    "on a machine with internet: python -c \"from torchvision.datasets import CIFAR10; "
    "CIFAR10('<root>', download=True)\" (or extract cifar-10-python.tar.gz from "
    "https://www.cs.toronto.edu/~kriz/cifar.html into <root>), then copy <root>/cifar-10-batches-py here"
)


class SmallImageDataset(Dataset):
    """`(x, y)` from a uint8 [N, 3, H, W] tensor at native size; `crop_flip` pads by `pad`, crops back at random
    and flips half the images (mammoth's training transform), only when `train` is set."""

    def __init__(self, images: torch.Tensor, targets, class_names: list[str], train: bool = True,
                 augment: str = "none", pad: int = 4):
        if augment not in SMALL_AUGMENTS:
            raise ConfigError(f"augment={augment!r} is not supported here; use one of {', '.join(SMALL_AUGMENTS)}")
        self.images = torch.as_tensor(images)
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {tuple(self.images.shape)}")
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(self.targets) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.targets)} targets")
        self.class_names = list(class_names)
        self.train, self.augment, self.pad = bool(train), augment, int(pad)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def eval_view(self) -> "SmallImageDataset":
        """The same samples (shared storage) without augmentation."""
        return self if not self.train else SmallImageDataset(self.images, self.targets, self.class_names, False,
                                                             "none", self.pad)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.images[i]
        if self.train and self.augment == "crop_flip":
            x = crop_flip(x, self.pad)
        return x, int(self.targets[i])


def crop_flip(x: torch.Tensor, pad: int) -> torch.Tensor:
    """RandomCrop(size, padding=pad) with zero padding, then a horizontal flip with probability 1/2 (torch RNG,
    so the trainer's seeded RNG state covers it)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad,) * 4)
    top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    x = padded[:, top:top + h, left:left + w]
    return x.flip(-1) if float(torch.rand(())) < 0.5 else x


def cifar10_tree(folder: Path) -> str:
    """The layout `read_cifar10` wants, drawn as text for error messages."""
    return "\n".join([
        "expected layout (torchvision's CIFAR-10 python copy):",
        f"  {folder.parent}/",
        f"    {CIFAR10_FOLDER}/",
        "      data_batch_1 ... data_batch_5   (pickles: 10000 images each, 'data' + 'labels')",
        "      test_batch                      (pickle: 10000 images)",
        "      batches.meta                    (pickle: 'label_names')",
        f"  where to get it: {CIFAR10_DOWNLOAD}",
    ])


def find_cifar10_folder(root: str | Path) -> Path:
    """`root/cifar-10-batches-py` (torchvision's root), or `root` itself when it already holds the files."""
    root = Path(root).absolute()
    if not (root / CIFAR10_FOLDER).is_dir() and (root / "batches.meta").is_file():
        return root
    return root / CIFAR10_FOLDER


def _read_batch(path: Path, tree: str) -> tuple[torch.Tensor, np.ndarray]:
    batch = _as_dict(safe_load(path), path, tree)
    data = _field(batch, "data", path, tree)
    labels = _field(batch, "labels", path, tree)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array [N, 3072], got {got}\n{tree}")
    targets = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(targets) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(targets)} labels\n{tree}")
    if len(targets) and (targets.min() < 0 or targets.max() >= CIFAR10_CLASSES):
        raise DatasetError(f"{path}: labels must lie in 0..{CIFAR10_CLASSES - 1}\n{tree}")
    # Row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major 32x32.
    return torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32)), targets


def read_cifar10(root: str | Path, augment: str = "none", name: str = "cifar10"
                 ) -> tuple[SmallImageDataset, SmallImageDataset]:
    """(train, test) from `root/cifar-10-batches-py/`; `DatasetError` with the expected tree when a file is
    missing, damaged, or not CIFAR-10."""
    if augment not in SMALL_AUGMENTS:
        raise ConfigError(f"{name}: augment={augment!r} is not supported; use one of {', '.join(SMALL_AUGMENTS)}")
    folder = find_cifar10_folder(root)
    tree = cifar10_tree(folder)
    if not folder.is_dir():
        raise DatasetError(f"{name}: CIFAR-10 folder not found: {folder}\n{tree}")
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file() or (folder / f).stat().st_size == 0]
    if missing:
        raise DatasetError(f"{name}: {folder} lacks (or has empty) {', '.join(missing)}\n{tree}")
    meta = _as_dict(safe_load(folder / "batches.meta"), folder / "batches.meta", tree)
    names = [_text(n) for n in _field(meta, "label_names", folder / "batches.meta", tree)]
    if len(names) != CIFAR10_CLASSES:
        raise DatasetError(f"{name}: {folder / 'batches.meta'} names {len(names)} classes, expected "
                           f"{CIFAR10_CLASSES} (is this CIFAR-100?)\n{tree}")
    parts = [_read_batch(folder / f, tree) for f in CIFAR10_TRAIN]
    train_x, train_y = torch.cat([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_batch(folder / "test_batch", tree)
    return (SmallImageDataset(train_x, train_y, names, train=True, augment=augment),
            SmallImageDataset(test_x, test_y, names, train=False, augment="none"))


def load_cifar10(cfg: dict, data_root: Path):
    """Registered as dataset `cifar10`: <root>/cifar-10-batches-py/, root = scenario.root or the data root."""
    from scenarios.datasets.benchmarks import _root
    from scenarios.config import get_str
    from scenarios.datasets.registry import LoadedData

    name = cfg.get("name") or "cifar10"
    root, hint = _root(cfg, data_root, ".")
    try:
        train, test = read_cifar10(root, augment=get_str(cfg, "augment", "none"), name=name)
    except DatasetError as e:
        missing = not (root / CIFAR10_FOLDER).is_dir() and not (root / "batches.meta").is_file()
        raise DatasetError(str(e) + (hint if hint and missing else "")) from None
    return LoadedData(train, test)


def _register() -> None:
    from scenarios.datasets.registry import DATASETS, register_dataset

    if "cifar10" not in DATASETS:
        register_dataset("cifar10")(load_cifar10)


_register()

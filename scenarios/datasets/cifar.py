"""CIFAR-100 from torchvision's on-disk copy (`cifar-100-python/{train,test,meta}`), read without running pickle code.

The three files are Python pickles of plain dicts (lists, bytes and one uint8 ndarray). `safe_load` unpickles them
with `RestrictedUnpickler`, which resolves only the numpy names an array needs and refuses every other global with
a `DatasetError`, so a tampered file cannot run code. Images stay in memory as one uint8 [N, 3, 32, 32] tensor;
items go through the same PILOT transforms as the ImageFolder benchmarks (PILOT's `cifar224`: CIFAR upsampled to
224 px by RandomResizedCrop + flip in training, Resize(256) + CenterCrop(224) at test), on a PIL image per item.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cl.engine.errors import ConfigError, DatasetError
from scenarios.datasets.imagefolder import AUGMENTS, PilotTransformed, eval_transform, pilot_train_transform

CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_CLASSES = 100
CIFAR_SHAPE = (3, 32, 32)
CIFAR100_DOWNLOAD = (
    "on a machine with internet, torchvision writes it: "
    "python -c \"from torchvision.datasets import CIFAR100; CIFAR100('<root>', download=True)\" "
    "(or extract cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html into <root>), "
    "then copy <root>/cifar-100-python here"
)


def _numpy_reconstruct():
    try:  # numpy >= 2 (numpy.core is a deprecated alias there)
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# (module, name) as written in the pickle -> the object it may resolve to. Nothing else is importable.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # files pickled under numpy 1.x (the real ones)
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # files pickled under numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR's files: numpy array reconstruction only; any other global is a `DatasetError`."""

    def __init__(self, file, *, source: str = "the pickle", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(
                f"{self.source}: refusing to unpickle it: it references '{module}.{name}', which a CIFAR-100 file "
                "never contains (only numpy array reconstruction is allowed). The file is not torchvision's "
                "CIFAR-100 copy, or it was tampered with: delete it and get the data again\n"
                f"  where to get it: {CIFAR100_DOWNLOAD}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DatasetError(f"{self.source}: refusing to unpickle it: it uses persistent ids, which CIFAR files never do")


def safe_load(path: str | Path) -> Any:
    """Unpickles one CIFAR file (Python 2 strings become bytes, as the CIFAR docs' `encoding='bytes'`)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, source=str(path), encoding="bytes").load()
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or garbled file: any failure means re-download
        raise DatasetError(
            f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e}); the file is damaged or truncated: "
            f"delete {path.parent} and get it again\n  where to get it: {CIFAR100_DOWNLOAD}"
        ) from None


class CifarDataset(PilotTransformed):
    """`(x, y)` from a uint8 [N, 3, 32, 32] tensor, each image through PILOT's transform as a PIL image.

    `train=True` with `augment="pilot"` applies the random crop and flip; otherwise the eval transform.
    Every item is a uint8 [3, image_size, image_size] tensor.
    """

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        targets: np.ndarray,
        class_names: list[str],
        image_size: int = 224,
        train: bool = True,
        augment: str = "pilot",
    ):
        if augment not in AUGMENTS:
            raise ConfigError(f"augment={augment!r} is not supported; use one of {', '.join(AUGMENTS)}")
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != CIFAR_SHAPE:
            raise ValueError(f"images must be uint8 [N, 3, 32, 32], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(self.targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.targets)} targets")
        self.class_names = list(class_names)
        self.image_size = int(image_size)
        self.train = bool(train)
        self.augment = augment
        augmenting = self.train and augment == "pilot"
        self.transform = pilot_train_transform(self.image_size) if augmenting else eval_transform(self.image_size)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        pixels = np.ascontiguousarray(self.images[i].numpy().transpose(1, 2, 0))  # HWC for PIL
        return self.transform(Image.fromarray(pixels)), int(self.targets[i])



def cifar100_tree(folder: Path) -> str:
    """The layout `read_cifar100` wants, drawn as text for error messages."""
    return "\n".join([
        "expected layout (torchvision's CIFAR-100 python copy):",
        f"  {folder.parent}/",
        f"    {CIFAR100_FOLDER}/",
        "      train   (pickle: 50000 images, fine_labels)",
        "      test    (pickle: 10000 images, fine_labels)",
        "      meta    (pickle: fine_label_names)",
        f"  where to get it: {CIFAR100_DOWNLOAD}",
    ])


def find_cifar100_folder(root: str | Path) -> Path:
    """`root/cifar-100-python` (torchvision's root), or `root` itself when it already holds the three files."""
    root = Path(root).absolute()
    if not (root / CIFAR100_FOLDER).is_dir() and all((root / f).is_file() for f in CIFAR100_FILES):
        return root
    return root / CIFAR100_FOLDER


def read_cifar100(
    root: str | Path, image_size: int = 224, augment: str = "pilot", name: str = "cifar100"
) -> tuple[CifarDataset, CifarDataset]:
    """(train, test) from torchvision's `root/cifar-100-python/{train,test,meta}`, after checking every file.

    Raises `DatasetError` with the expected tree and how to get the data when a file is missing, damaged,
    refers to anything but numpy arrays, or does not hold CIFAR-100 (100 fine labels, uint8 [N, 3072] data).
    """
    if augment not in AUGMENTS:
        raise ConfigError(f"{name}: augment={augment!r} is not supported; use one of {', '.join(AUGMENTS)}")
    folder = find_cifar100_folder(root)
    tree = cifar100_tree(folder)
    if not folder.is_dir():
        raise DatasetError(f"{name}: CIFAR-100 folder not found: {folder}\n{tree}")
    missing = [f for f in CIFAR100_FILES if not (folder / f).is_file() or (folder / f).stat().st_size == 0]
    if missing:
        raise DatasetError(f"{name}: {folder} lacks (or has empty) {', '.join(missing)}\n{tree}")
    meta = _as_dict(safe_load(folder / "meta"), folder / "meta", tree)
    class_names = [_text(n) for n in _field(meta, "fine_label_names", folder / "meta", tree)]
    if len(class_names) != CIFAR100_CLASSES:
        raise DatasetError(
            f"{name}: {folder / 'meta'} names {len(class_names)} fine classes, expected {CIFAR100_CLASSES} "
            f"(is this CIFAR-10 or another dataset?)\n{tree}"
        )
    splits = []
    for split in ("train", "test"):
        images, targets = _read_split(folder / split, tree)
        absent = sorted(set(range(CIFAR100_CLASSES)) - set(np.unique(targets).tolist()))
        if absent:
            raise DatasetError(
                f"{name}: {folder / split} has no images of {len(absent)} classes (e.g. {absent[:5]}): "
                f"the copy is incomplete\n{tree}"
            )
        splits.append(CifarDataset(images, targets, class_names, image_size, train=split == "train", augment=augment))
    return splits[0], splits[1]


def _read_split(path: Path, tree: str) -> tuple[torch.Tensor, np.ndarray]:
    batch = _as_dict(safe_load(path), path, tree)
    data = _field(batch, "data", path, tree)
    labels = _field(batch, "fine_labels", path, tree)
    n_values = int(np.prod(CIFAR_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_values:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{path}: 'data' must be a uint8 array [N, {n_values}], got {got}\n{tree}")
    try:
        targets = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetError(f"{path}: 'fine_labels' must be a list of integers\n{tree}") from None
    if len(targets) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(targets)} fine_labels\n{tree}")
    if len(targets) and (targets.min() < 0 or targets.max() >= CIFAR100_CLASSES):
        raise DatasetError(f"{path}: fine_labels must lie in 0..{CIFAR100_CLASSES - 1}\n{tree}")
    # Row layout: 1024 red, then 1024 green, then 1024 blue values, each plane row-major 32x32.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, *CIFAR_SHAPE))
    return images, targets


def _as_dict(obj: Any, path: Path, tree: str) -> dict:
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}\n{tree}")
    return obj


def _field(d: dict, key: str, path: Path, tree: str) -> Any:
    """`d[b'key']` (the files' Python 2 strings, read as bytes) or `d['key']` (files re-pickled with str keys)."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    keys = ", ".join(sorted(_text(k) for k in d)[:8])
    raise DatasetError(f"{path}: no '{key}' entry (keys: {keys}); not a CIFAR-100 file\n{tree}")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)

"""`root/<class_name>/<images>` trees: the one reader every real image benchmark (ImageNet-R, CUB, ...) reuses.

`read_imagefolder_split` checks a whole `root/train` + `root/test` copy before any training starts, so a missing or
damaged dataset fails in seconds with the expected layout and where the data comes from, not hours into a run.

Damaged images (empty, unreadable, truncated) follow `scenario.bad_images`: `fail` (the default) stops with the
first one named, `skip` leaves them out at scan time and reports each one (`BadImageReport`, recorded in the
result's `data_warnings` by `cl/app/experiment.py`). Never silently: a file that decodes badly later, during training,
is a `DatasetError` naming it.
"""
from __future__ import annotations

import copy
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cl.engine.transforms import eval_transform  # noqa: F401  (re-exported: the readers' test transform)
from cl.engine.errors import ConfigError, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
AUGMENTS = ("pilot", "none")
SPLITS = ("train", "test")
BAD_IMAGE_POLICIES = ("fail", "skip")


@dataclass
class BadImageReport:
    """The damaged image files a `skip` policy left out: (path, problem) pairs, in scan order."""

    policy: str = "fail"
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def as_warnings(self) -> list[dict]:
        """For the result's `data_warnings`: one entry with the count and every skipped file."""
        if not self.skipped:
            return []
        first, why = self.skipped[0]
        return [{
            "type": "skipped_images",
            "policy": self.policy,
            "count": len(self.skipped),
            "files": [{"path": path, "problem": problem} for path, problem in self.skipped],
            "message": (f"{len(self.skipped)} empty, unreadable or truncated image file(s) were left out "
                        f"(scenario.bad_images=skip); first: {first} ({why}); all are listed in the result's "
                        f"data_warnings"),
        }]


_ACTIVE_POLICY: ContextVar[BadImageReport | None] = ContextVar("bad_images_policy", default=None)


@contextmanager
def bad_images_policy(policy: str):
    """The policy for every `read_imagefolder_split` in the block (dataset loaders need not pass it through);
    yields the `BadImageReport` that collects what `skip` left out."""
    if policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"unknown scenario.bad_images '{policy}': expected one of {', '.join(BAD_IMAGE_POLICIES)}")
    report = BadImageReport(policy)
    token = _ACTIVE_POLICY.set(report)
    try:
        yield report
    finally:
        _ACTIVE_POLICY.reset(token)


def pilot_train_transform(image_size: int) -> v2.Compose:
    """PILOT's training crop (no normalisation), ending in uint8."""
    return v2.Compose([
        v2.RandomResizedCrop(image_size, scale=(0.05, 1.0), ratio=(3 / 4, 4 / 3)),
        v2.RandomHorizontalFlip(),
        v2.PILToTensor(),
    ])


def scan_class_folders(root: str | Path) -> dict[str, list[str]]:
    """Class folder name -> image paths, both in torchvision ImageFolder's order (sorted; subfolders walked).

    Hidden entries (".DS_Store", "._x.jpg" from macOS archives, ".ipynb_checkpoints") are skipped.
    """
    index: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = []
        for folder, dirs, names in sorted(os.walk(entry.path, followlinks=True)):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            files += [
                os.path.join(folder, n)
                for n in sorted(names)
                if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
            ]
        index[entry.name] = files
    return index


class PilotTransformed(Dataset):
    """Images that go through PILOT's train or eval transform: the item shape and the eval view are shared
    (ImageFolder trees and CIFAR-100 alike). Subclasses set `image_size`, `train`, `augment` and `transform`."""

    image_size: int
    train: bool
    augment: str

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def eval_view(self) -> "PilotTransformed":
        """The same samples (shared storage) with the eval transform."""
        if not (self.train and self.augment == "pilot"):
            return self
        view = copy.copy(self)
        view.train = False
        view.transform = eval_transform(self.image_size)
        return view


class ImageFolderDataset(PilotTransformed):
    """Images under `root/<class_name>/`, labelled 0..K-1 by sorted folder name, decoded on access.

    `train=True` with `augment="pilot"` applies PILOT's random crop and flip; otherwise the eval transform.
    Every item is a uint8 [3, image_size, image_size] tensor. `index` reuses a `scan_class_folders` result.
    """

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        train: bool = True,
        augment: str = "pilot",
        *,
        index: dict[str, list[str]] | None = None,
    ):
        if augment not in AUGMENTS:
            raise ConfigError(f"augment={augment!r} is not supported; use one of {', '.join(AUGMENTS)}")
        self.root = Path(root)
        if index is None:
            if not self.root.is_dir():
                raise DatasetError(f"image folder not found: {self.root}")
            index = scan_class_folders(self.root)
        self.image_size = int(image_size)
        self.train = bool(train)
        self.augment = augment
        self.class_names = list(index)
        self.samples = [(path, label) for label, name in enumerate(self.class_names) for path in index[name]]
        self.targets = np.array([label for _, label in self.samples], dtype=np.int64)
        augmenting = self.train and augment == "pilot"
        self.transform = pilot_train_transform(self.image_size) if augmenting else eval_transform(self.image_size)

    cache = None  # a cl.engine.cache.ImageCache when scenario.image_cache is on: decoded once, augmented on the device

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        if self.cache is not None:
            augmenting = self.train and self.augment == "pilot"
            if not augmenting:
                return self.cache.eval_item(i), int(label)
            if self.cache.train_array is not None:  # image_cache=true: crops from the cached copy
                return self.cache.train_item(i), int(label)
            # image_cache=exact: augmented crops are still taken from the file, as the reference does
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for damaged data
            raise DatasetError(
                f"{path}: cannot decode this image ({type(e).__name__}: {e}); it is damaged in a way the start-up "
                "check did not see, or changed since: replace or delete it and run the same command to resume"
            ) from None
        return self.transform(rgb), int(label)



def read_imagefolder_split(
    root: str | Path,
    expected_classes: int | None = None,
    image_size: int = 224,
    augment: str = "pilot",
    name: str = "dataset",
    source_hint: str = "",
    bad_images: str | None = None,
) -> tuple[ImageFolderDataset, ImageFolderDataset]:
    """(train, test) from `root/train` and `root/test`, after checking the copy is complete and readable.

    Raises `DatasetError` naming the fix: missing folders (with the expected tree), wrong class count,
    train/test class folders that differ, class folders without images, empty, unreadable or truncated image files.
    `bad_images` (`fail`/`skip`; default: the enclosing `bad_images_policy`, else `fail`) decides what damaged
    files do; skipped ones are listed in `dataset.skipped_files` and in the active `BadImageReport`.
    """
    report = _ACTIVE_POLICY.get()
    policy = bad_images or (report.policy if report is not None else "fail")
    if policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"{name}: bad_images={policy!r} is not supported; use one of {', '.join(BAD_IMAGE_POLICIES)}")
    if augment not in AUGMENTS:
        raise ConfigError(f"{name}: augment={augment!r} is not supported; use one of {', '.join(AUGMENTS)}")
    root = Path(root).absolute()
    tree = expected_tree(root, expected_classes, source_hint)
    if not root.is_dir():
        raise DatasetError(f"{name}: dataset folder not found: {root}\n{tree}")
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DatasetError(f"{name}: {root} has no {split}/ folder\n{tree}")
    indexes = {split: scan_class_folders(root / split) for split in SPLITS}
    for split, index in indexes.items():
        _check_class_count(name, root / split, len(index), expected_classes, tree)
    _check_same_classes(name, root, indexes["train"], indexes["test"])
    _check_no_empty_classes(name, root, indexes)
    paths = [p for index in indexes.values() for files in index.values() for p in files]
    bad = _damaged_files(paths)
    if bad and policy == "fail":
        first, why = bad[0]
        raise DatasetError(
            f"{name}: {len(bad)} of {len(paths)} image files are empty or unreadable; first: {first} ({why}); "
            "re-download or re-extract the dataset (or delete the damaged files), or set scenario.bad_images=skip "
            "to leave them out (they are then listed in the result's data_warnings)"
        )
    if bad:
        dropped = {p for p, _ in bad}
        indexes = {split: {cls: [p for p in files if p not in dropped] for cls, files in index.items()}
                   for split, index in indexes.items()}
        if report is not None:
            report.skipped.extend(bad)
        _check_no_empty_classes(name, root, indexes)
    train = ImageFolderDataset(root / "train", image_size, train=True, augment=augment, index=indexes["train"])
    test = ImageFolderDataset(root / "test", image_size, train=False, augment=augment, index=indexes["test"])
    train.skipped_files = [(p, why) for p, why in bad if _under(p, root / "train")]
    test.skipped_files = [(p, why) for p, why in bad if _under(p, root / "test")]
    return train, test


def _under(path: str, folder: Path) -> bool:
    return path.startswith(str(folder) + os.sep)


def expected_tree(root: Path, expected_classes: int | None, source_hint: str) -> str:
    """The layout `read_imagefolder_split` wants, drawn as text for error messages."""
    count = f"{expected_classes} class folders" if expected_classes else "one folder per class"
    lines = [
        f"expected layout ({count}, the same names in train/ and test/):",
        f"  {root}/",
        "    train/",
        "      <class_a>/ img1.jpg img2.jpg ...",
        "      <class_b>/ ...",
        "    test/",
        "      <class_a>/ ...",
        "      <class_b>/ ...",
        f"  image files: {' '.join(IMAGE_EXTENSIONS)} (any case)",
    ]
    lines.append(f"  where to get it: {source_hint}" if source_hint else "  where to get it: (no source recorded)")
    return "\n".join(lines)


def _check_class_count(name: str, folder: Path, found: int, expected: int | None, tree: str) -> None:
    if found == 0:
        raise DatasetError(f"{name}: {folder} holds no class folders\n{tree}")
    if expected is not None and found != expected:
        raise DatasetError(
            f"{name}: {folder} has {found} class folders, expected {expected}: the copy is incomplete or the root "
            f"points at the wrong folder (or set the expected class count to match)\n{tree}"
        )


def _check_same_classes(name: str, root: Path, train: dict, test: dict) -> None:
    only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
    if only_train or only_test:
        raise DatasetError(
            f"{name}: the class folders of {root}/train and {root}/test differ "
            f"(only in train: {_some(only_train)}; only in test: {_some(only_test)}); "
            "both splits must hold the same class folder names, since labels come from their sorted order"
        )


def _check_no_empty_classes(name: str, root: Path, indexes: dict[str, dict]) -> None:
    empty = [f"{split}/{cls}" for split, index in indexes.items() for cls, files in index.items() if not files]
    if empty:
        raise DatasetError(
            f"{name}: {len(empty)} class folder(s) under {root} hold no images ({' '.join(IMAGE_EXTENSIONS)}): "
            f"{_some(empty)}; copy the missing images in (re-extract the dataset)"
        )


def _damaged_files(paths: list[str]) -> list[tuple[str, str]]:
    """(path, problem) for every file that is empty, has no image header PIL recognises, or is truncated.

    Cheap on 100k files: the header is read, and the last bytes are compared with the format's end marker (JPEG's
    EOI, PNG's IEND); only a file that does not end with it (or another format) is fully decoded to decide."""
    Image.init()  # register PIL's plugins once, before the threads use them
    if len(paths) > 256:
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
            problems = list(pool.map(_file_problem, paths))
    else:
        problems = [_file_problem(p) for p in paths]
    return [(p, why) for p, why in zip(paths, problems) if why]


def _file_problem(path: str) -> str | None:
    try:
        if os.path.getsize(path) == 0:
            return "0 bytes"
        with open(path, "rb") as f:
            with Image.open(f) as image:
                image.size
                fmt = image.format
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
            tail = f.read()
        if not _ends_complete(fmt, tail):
            with Image.open(path) as image:
                image.load()  # the full decode decides: trailing bytes are fine, missing ones are not
    except Exception as e:  # noqa: BLE001 - any failure to open or decode means the file is unusable
        return f"{type(e).__name__}: {e}"
    return None


def _ends_complete(fmt: str | None, tail: bytes) -> bool:
    if fmt == "JPEG":
        return tail.rstrip(b"\x00 \t\r\n").endswith(b"\xff\xd9")
    if fmt == "PNG":
        return b"IEND" in tail[-12:]
    return False  # other formats: always decoded


def _some(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more

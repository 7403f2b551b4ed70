"""Fashion-MNIST (Xiao et al. 2017; MIT) from its original idx.gz files: 60,000 train + 10,000 test, 28 x 28 grey,
10 classes. Registered as dataset `fashion-mnist` (scenarios `fashion-mnist`, `fashion-mnist-til`).

Where the files are looked for, in order: `scenario.root` (absolute, or relative to the data root), else
`<data_root>/fashion-mnist/`, else the Debian package's `/usr/share/datasets/fashion-mnist/`
(`apt-get install dataset-fashion-mnist`). Layout (the files as released):

    train-images-idx3-ubyte.gz   idx3: magic 0x00000803, [60000, 28, 28] uint8
    train-labels-idx1-ubyte.gz   idx1: magic 0x00000801, [60000] uint8
    t10k-images-idx3-ubyte.gz    [10000, 28, 28]
    t10k-labels-idx1-ubyte.gz    [10000]

Plain (un-gzipped) copies without the `.gz` are read too. Images stay in memory as uint8 [N, 1, 28, 28]; the
trainer scales them to [0, 1], repeats the grey channel and resizes to the backbone's input size.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from cl.engine.errors import DatasetError

FOLDER = "fashion-mnist"
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
INSTALL_HINT = ("apt-get install dataset-fashion-mnist (Debian/Ubuntu: puts the idx.gz files in "
                f"{DEBIAN_ROOT}/), or copy the four files from https://github.com/zalandoresearch/fashion-mnist "
                "(data/fashion) into <data_root>/fashion-mnist/")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array of its declared shape; a one-line error if it is not one."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read this idx file ({type(e).__name__}: {e}); "
                           f"reinstall it: {INSTALL_HINT}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path}: not an unsigned-byte idx file (magic {raw[:4].hex()}); "
                           f"reinstall it: {INSTALL_HINT}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but {body.size} follow "
                           f"(truncated?); reinstall it: {INSTALL_HINT}")
    return body.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def candidate_roots(data_root: Path, root: str | None) -> list[Path]:
    if root:
        given = Path(root).expanduser()
        return [given if given.is_absolute() else data_root / given]
    return [data_root / FOLDER, DEBIAN_ROOT]


def locate(data_root: Path, root: str | None = None) -> Path:
    """The first candidate folder that holds all four files; else a DatasetError naming the apt package."""
    roots = candidate_roots(data_root, root)
    for folder in roots:
        if all(_find(folder, stem) for pair in FILES.values() for stem in pair):
            return folder
    looked = ", ".join(str(r) for r in roots)
    names = ", ".join(f"{s}.gz" for pair in FILES.values() for s in pair)
    raise DatasetError(f"Fashion-MNIST not found (looked in {looked} for {names}): {INSTALL_HINT}")


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 1, 28, 28], int64 [N]) of one split, checked against the released counts and label range."""
    images_stem, labels_stem = FILES[split]
    images = read_idx(_find(folder, images_stem))
    labels = read_idx(_find(folder, labels_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{folder}: {split} images {images.shape} and labels {labels.shape} do not pair up; "
                           f"reinstall: {INSTALL_HINT}")
    if labels.size and int(labels.max()) >= len(CLASS_NAMES):
        raise DatasetError(f"{folder}: {split} labels go up to {int(labels.max())}, Fashion-MNIST has 10 classes")
    return images[:, None].copy(), labels.astype(np.int64)


def load_fashion_mnist(cfg: dict, data_root: Path):
    """Registered as dataset `fashion-mnist`; `scenario.root` overrides where the files are looked for."""
    from cl.engine.in_memory import TensorImageDataset
    from scenarios.datasets.registry import LoadedData

    folder = locate(Path(data_root), cfg.get("root"))
    (xtr, ytr), (xte, yte) = read_split(folder, "train"), read_split(folder, "test")
    return LoadedData(TensorImageDataset(xtr, ytr, class_names=CLASS_NAMES),
                      TensorImageDataset(xte, yte, class_names=CLASS_NAMES))


def _register() -> None:
    from scenarios.datasets.registry import DATASETS, register_dataset

    if "fashion-mnist" not in DATASETS:
        register_dataset("fashion-mnist")(load_fashion_mnist)


_register()

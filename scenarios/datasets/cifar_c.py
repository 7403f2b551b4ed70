"""CIFAR-10-C / CIFAR-100-C from the released `.npy` files (Hendrycks & Dietterich; Zenodo 2535967 and 3555552).

Layout (RobustBench `load_corruptions_cifar`):

    <data_root>/CIFAR-10-C/<corruption>.npy    uint8 [50000, 32, 32, 3]: severities 1..5 stacked, 10,000 each,
                                                in CIFAR test order
    <data_root>/CIFAR-10-C/labels.npy          [50000]: the 10,000 test labels repeated 5 times

Severity s is rows (s-1)*10000 .. s*10000 of each corruption file; its labels are labels[:10000]. Images go
NHWC -> NCHW as uint8 (scaled to [0, 1] by the trainer); no mean/std normalisation (the model has its own).
Files are memory-mapped, so one severity is read without loading the other four.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cl.engine.errors import ConfigError

FOLDERS = {"cifar10-c": "CIFAR-10-C", "cifar100-c": "CIFAR-100-C"}
SOURCES = {"cifar10-c": "https://zenodo.org/record/2535967 (CIFAR-10-C.tar)",
           "cifar100-c": "https://zenodo.org/record/3555552 (CIFAR-100-C.tar)"}
PER_SEVERITY = 10000


def expected_tree(dataset: str, root: Path, corruptions) -> str:
    folder = root / FOLDERS[dataset]
    names = "\n".join(f"    {folder / (c + '.npy')}   uint8 [50000, 32, 32, 3]" for c in corruptions)
    return (f"expected the released {FOLDERS[dataset]} files:\n{names}\n    {folder / 'labels.npy'}   [50000]\n"
            f"  from {SOURCES[dataset]}; extract it under data_root ({root})")


def load_cifar_c(dataset: str, root: Path, corruption: str, severity: int, n_examples: int | None = None,
                 all_corruptions=()) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 [N, 3, 32, 32], int64 [N]) of one corruption at one severity, first n_examples in file order."""
    if dataset not in FOLDERS:
        raise ConfigError(f"unknown corruption dataset '{dataset}': expected one of {', '.join(FOLDERS)}")
    if not 1 <= int(severity) <= 5:
        raise ConfigError(f"{dataset}: severity must be 1..5, got {severity}")
    folder = Path(root) / FOLDERS[dataset]
    files = [folder / f"{corruption}.npy", folder / "labels.npy"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{dataset}: missing {', '.join(missing)}; "
                          + expected_tree(dataset, Path(root), all_corruptions or (corruption,)))
    images = np.load(files[0], mmap_mode="r")
    labels = np.load(files[1], mmap_mode="r")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or len(images) < severity * PER_SEVERITY \
            or len(labels) < PER_SEVERITY:
        raise ConfigError(f"{files[0]}: shape {images.shape} (labels {labels.shape}) is not the released layout; "
                          + expected_tree(dataset, Path(root), (corruption,)))
    n = PER_SEVERITY if n_examples is None else min(int(n_examples), PER_SEVERITY)
    start = (int(severity) - 1) * PER_SEVERITY
    x = torch.from_numpy(np.array(images[start: start + n])).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(np.asarray(labels[:n]).astype(np.int64))
    return x, y

"""Datasets held as one uint8 tensor: the bundled digits, the synthetic set and test fixtures."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """`(x, y)` pairs from a uint8 [N, C, H, W] tensor. No transform, so it needs no `eval_view()`."""

    def __init__(
        self,
        images: torch.Tensor | np.ndarray,
        targets: Sequence[int] | np.ndarray,
        class_names: Sequence[str] | None = None,
        domains: Sequence | np.ndarray | None = None,
    ):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        targets = np.asarray(targets, dtype=np.int64).reshape(-1)
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        if domains is not None:
            domains = np.asarray(domains).reshape(-1)
            if len(domains) != len(images):
                raise ValueError(f"{len(images)} images but {len(domains)} domain ids")
        self.images = images
        self.targets = targets
        self.class_names = list(class_names) if class_names is not None else None
        self.domains = domains

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])


def input_shape_of(dataset: Dataset) -> tuple[int, ...]:
    """The `(C, H, W)` of the dataset's images, without decoding one when the dataset declares it."""
    shape = getattr(dataset, "input_shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    return tuple(dataset[0][0].shape)

"""Loaders and the device-side input conversion.

Datasets yield uint8 images `[C, H, W]`; conversion to float, channel expansion and resizing to the
backbone's input size happen here, once per batch on the device, instead of per sample on the CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class WatchedLoader(DataLoader):
    """A DataLoader whose passes go through `cl.engine.progress.watch` (a bar after a few seconds, and the run's stop
    check between batches) while `desc` is set. The trainer clears `desc` on the loader its SGD loop drives (that
    loop has its own bar and stop checks), and names the phase when it hands the loader to a strategy."""

    desc: str | None = "data pass"

    def __iter__(self):
        it = super().__iter__()
        if self.desc is None:
            return it
        from cl.engine.progress import watch

        return watch(it, desc=self.desc, total=len(self))


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                pin_memory: bool = False, drop_last: bool = False, desc: str | None = "data pass") -> DataLoader:
    """A loader whose order depends only on `seed`: resuming at an experience boundary replays it exactly.

    Its passes are watched (progress bar, stop signal) under the name `desc`; `desc=None` iterates plainly."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    loader = WatchedLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last and len(dataset) > batch_size,
        persistent_workers=False,
    )
    loader.desc = desc
    return loader


class WithExtras(Dataset):
    """`(x, y, extras)`: the dataset's item plus what a strategy asked for (cl/engine/strategy.py, Batch): `index` (the
    position in `dataset`) and/or `raw` (the same sample from `dataset.eval_view()`, i.e. not augmented; with
    `scenario.image_cache` that is the cache's evaluation array). Used only when a strategy asks."""

    def __init__(self, dataset: Dataset, *, index: bool = False, raw: bool = False):
        from cl.engine.stream import eval_view

        self.dataset, self.index = dataset, bool(index)
        self.raw_view = eval_view(dataset) if raw else None
        if raw and self.raw_view is dataset and _augments(dataset):
            raise ValueError(f"{type(dataset).__name__} augments its training items but has no eval_view(): the "
                             "un-augmented input a strategy asked for (needs_raw_input) cannot be read; add eval_view()")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        extras = {"index": i} if self.index else {}
        if self.raw_view is not None:
            extras["raw"] = self.raw_view[i][0]
        return x, y, extras


def _augments(dataset) -> bool:
    """Whether a dataset (or one it wraps) applies a random training transform."""
    for inner in (getattr(dataset, "dataset", None), getattr(dataset, "base", None)):
        if inner is not None and _augments(inner):
            return True
    parts = getattr(dataset, "datasets", None)
    if parts is not None:
        return any(_augments(d) for d in parts)
    return bool(getattr(dataset, "train", False)) and getattr(dataset, "augment", "none") not in ("none", None)


def unit_float(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (or float) images -> float in [0, 1] on `device`, at their own size (Batch.raw)."""
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def to_model_input(x: torch.Tensor, size: int, channels: int, device: torch.device) -> torch.Tensor:
    """uint8 `[B, C, H, W]` (or float in [0, 1]) -> float `[B, channels, size, size]` in [0, 1] on `device`.

    Text batches (the `text` kind: the default collate makes a list of strings) pass through unchanged; the
    text backbone tokenises them on its own device (cl/models/backbones_hf.py)."""
    if isinstance(x, (list, tuple)):
        return list(x)
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        else:
            raise ValueError(f"images have {x.shape[1]} channels, the backbone expects {channels}")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x

"""Dataset name -> loader function. A new benchmark (ImageNet-R, CIFAR-100, ...) is one registered loader; another
installed package adds one through a `clbench.datasets` entry point (cl/app/plugins.py).

A loader takes the scenario config (a plain dict) and the resolved data root and returns a `LoadedData`;
it must fail with `DatasetError` (expected layout, where to get the data) when files are missing.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch.utils.data import Dataset

from scenarios.config import check_choice


@dataclass
class LoadedData:
    """What a loader hands the builders: both splits and, for multi-domain data, each sample's domain id."""

    train: Dataset
    test: Dataset
    domains_train: np.ndarray | None = None
    domains_test: np.ndarray | None = None


Loader = Callable[[dict, Path], LoadedData]
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Decorator: `@register_dataset("imagenet_r") def load(cfg, data_root) -> LoadedData`."""

    def add(loader: Loader) -> Loader:
        if name in DATASETS and DATASETS[name] is not loader:
            raise ValueError(f"dataset '{name}' is already registered")
        DATASETS[name] = loader
        return loader

    return add


def get_loader(name: str) -> Loader:
    """The registered loader, else one of another installed package's `clbench.datasets` entry points (imported now)."""
    from cl.engine import entry_points as plugins

    if name not in DATASETS and name in plugins.entry_points("datasets"):
        register_dataset(name)(plugins.load("datasets", name))
    check_choice("dataset", name, {*DATASETS, *plugins.entry_points("datasets")})
    return DATASETS[name]


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The folder relative dataset roots live in: the argument, else $CL_DATA, else ./data."""
    if data_root is None:
        data_root = os.environ.get("CL_DATA") or "data"
    return Path(data_root).expanduser()

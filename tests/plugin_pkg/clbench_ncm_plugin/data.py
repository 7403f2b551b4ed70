"""A dataset reader from a plugin: scikit-learn's digits under another name."""
from __future__ import annotations

from pathlib import Path

from scenarios.datasets.registry import LoadedData


def load_plugin_digits(cfg: dict, data_root: Path) -> LoadedData:
    from scenarios.datasets.digits import load_digits_dataset

    train, test = load_digits_dataset()
    return LoadedData(train, test)

"""The datasets that ship with clbench: `digits` and `synthetic` (no files) and the generic `imagefolder`."""
from __future__ import annotations

from pathlib import Path

from cl.engine.errors import DatasetError
from scenarios.config import get_float, get_int, get_str
from scenarios.datasets.digits import load_digits_dataset
from scenarios.datasets.imagefolder import read_imagefolder_split
from scenarios.datasets.registry import LoadedData, register_dataset
from scenarios.datasets.synthetic import make_synthetic


@register_dataset("digits")
def load_digits(cfg: dict, data_root: Path) -> LoadedData:
    train, test = load_digits_dataset()
    return LoadedData(train, test)


@register_dataset("synthetic")
def load_synthetic(cfg: dict, data_root: Path) -> LoadedData:
    sub = cfg.get("synthetic") or {}
    where = "scenario.synthetic"
    train, test = make_synthetic(
        n_classes=get_int(sub, "n_classes", 10, minimum=1, where=where),
        n_domains=get_int(sub, "n_domains", 1, minimum=1, where=where),
        image_size=get_int(sub, "image_size", 32, minimum=4, where=where),
        channels=get_int(sub, "channels", 3, minimum=1, where=where),
        train_per_class=get_int(sub, "train_per_class", 60, minimum=1, where=where),
        test_per_class=get_int(sub, "test_per_class", 20, minimum=1, where=where),
        noise=get_float(sub, "noise", 0.15, where=where),
        seed=get_int(sub, "seed", 0, minimum=0, where=where),
        difficulty=get_float(sub, "difficulty", 0.0, where=where),
    )
    return LoadedData(train, test, train.domains, test.domains)


@register_dataset("imagefolder")
def load_imagefolder(cfg: dict, data_root: Path) -> LoadedData:
    name = cfg.get("name") or "imagefolder"
    given = Path(get_str(cfg, "root", where=name)).expanduser()
    root = given if given.is_absolute() else data_root / given
    try:
        train, test = read_imagefolder_split(
            root,
            expected_classes=get_int(cfg, "n_classes", None, minimum=1, where=name),
            image_size=get_int(cfg, "image_size", 224, minimum=1, where=name),
            augment=get_str(cfg, "augment", "pilot", where=name),
            name=name,
            source_hint=get_str(cfg, "source_hint", "", where=name) or "",
        )
    except DatasetError as e:
        if given.is_absolute():
            raise
        raise DatasetError(
            f"{e}\n  (root '{given}' is relative to the data root {data_root.absolute()}: set data_root "
            "or the CL_DATA environment variable to the folder that holds it)"
        ) from None
    return LoadedData(train, test)

"""Scenario builders: a config in, a `cl.engine.stream.Stream` out.

`build(cfg)` looks the kind up in `KINDS` and calls its builder; the incremental kinds look the dataset up in the
registry (`scenarios.datasets.registry.DATASETS`), load its train/test splits and cut them into experiences with
`scenarios.kinds.builders`.

`KINDS` is the one registry of scenario kinds: each names the `cl.engine.kinds.Kind` record its module declares (stream
builder, evaluation protocol, metrics, console lines), imported when first used.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cl.engine.errors import ConfigError
from cl.engine.kinds import Kind
from cl.engine.stream import Stream
from scenarios.datasets import loaders as _builtin_loaders  # noqa: F401  (registers digits, synthetic, imagefolder)
from scenarios.datasets import benchmarks as _benchmarks  # noqa: F401  (registers cifar100, imagenet-r, ... vtab)
from scenarios.datasets import domainnet as _domainnet  # noqa: F401  (registers domainnet: CoSO's InfLoRA split lists)
from scenarios.datasets import cifar10 as _cifar10  # noqa: F401  (registers cifar10: torchvision's cifar-10-batches-py)
from scenarios.datasets import tiny_imagenet as _tiny_imagenet  # noqa: F401  (registers tiny-imagenet: tiny-imagenet-200/)
from scenarios.datasets import fashion_mnist as _fashion_mnist  # noqa: F401  (registers fashion-mnist: the idx.gz files)
from scenarios.kinds.builders import class_incremental, class_order, domain_incremental, task_splits
from scenarios.config import as_dict, check_choice, get_str
from scenarios.datasets.base import (
    ImageFolderDataset,
    TargetSubset,
    TensorImageDataset,
    load_digits_dataset,
    make_synthetic,
    read_imagefolder_split,
)
from scenarios.datasets.registry import DATASETS, LoadedData, get_loader, register_dataset, resolve_data_root

# Every scenario kind: "module:attr" of its `cl.engine.kinds.Kind` record, imported when used.
KINDS: dict[str, str] = {
    "class_il": "scenarios.kinds.incremental:CLASS_IL",
    "task_il": "scenarios.kinds.incremental:TASK_IL",
    "domain_il": "scenarios.kinds.incremental:DOMAIN_IL",
    "fscil": "scenarios.kinds.fscil:KIND",
    "tta": "scenarios.kinds.tta:KIND",
    "union_label": "scenarios.kinds.union_label:KIND",
    "forgetting": "scenarios.kinds.forgetting:KIND",
    "text": "scenarios.kinds.text:KIND",
}
BUILD_KINDS = ("class_il", "task_il", "domain_il")  # the kinds built from any labelled dataset (scenarios/kinds/incremental.py)
# Datasets that come with their own stream builder (same signature), whatever the kind.
DATASET_BUILDERS: dict[str, str] = {
    "avalanche": "scenarios.datasets.avalanche_benchmarks:build_avalanche",
}
DEFAULT_CLASS_ORDER_SEED = 1993  # the PILOT family's seed (scenarios/kinds/incremental.py)

__all__ = [
    "BUILD_KINDS", "DATASETS", "KINDS", "ImageFolderDataset", "all_kinds", "get_kind", "LoadedData", "TargetSubset", "TensorImageDataset",
    "build", "class_incremental", "class_order", "domain_incremental", "load_digits_dataset", "make_synthetic",
    "read_imagefolder_split", "register_dataset", "resolve_data_root", "task_splits",
]


def get_kind(name: str) -> Kind:
    """The `Kind` record registered under `name` (a one-line ConfigError naming the valid ones otherwise)."""
    check_choice("scenario kind", name, tuple(KINDS))
    from cl.engine.lazy import load

    record = load(KINDS[name])
    if not isinstance(record, Kind) or record.name != name:
        raise TypeError(f"{KINDS[name]} must be the cl.engine.kinds.Kind record of kind {name!r}")
    return record


def all_kinds() -> dict[str, Kind]:
    """Every registered kind's record (imports each kind's module)."""
    return {name: get_kind(name) for name in KINDS}


def build(cfg: Any, data_root: str | Path | None = None) -> Stream:
    """The stream a scenario config describes; names are checked before any data is read."""
    cfg = as_dict(cfg)
    dataset = get_str(cfg, "dataset")
    kind = get_kind(get_str(cfg, "kind", "class_il"))
    if dataset in DATASET_BUILDERS:  # a whole stream made elsewhere, e.g. Avalanche's benchmark generators
        from cl.engine.lazy import load

        stream = load(DATASET_BUILDERS[dataset])(cfg, data_root)
        if stream.info.kind != kind.name:
            raise ConfigError(f"scenario '{dataset}' built a {stream.info.kind} stream, not {kind.name}: "
                              f"set scenario.kind={stream.info.kind}")
        stream.protocol = kind.protocol  # built outside clbench's kinds: evaluated as the kind declares
        return stream
    return kind.build_stream(cfg, data_root)

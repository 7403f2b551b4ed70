"""Scenario builders: a config in, a `cl.engine.stream.Stream` out.

`build(cfg)` looks the dataset up in the registry (`scenarios.datasets.registry.DATASETS`), loads its train/test
splits and cuts them into experiences with `scenarios.kinds.builders`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cl.engine.errors import ConfigError
from cl.engine.stream import Stream
from scenarios.datasets import loaders as _builtin_loaders  # noqa: F401  (registers digits, synthetic, imagefolder)
from scenarios.datasets import benchmarks as _benchmarks  # noqa: F401  (registers cifar100, imagenet-r, ... vtab)
from scenarios.datasets import domainnet as _domainnet  # noqa: F401  (registers domainnet: CoSO's InfLoRA split lists)
from scenarios.datasets import cifar10 as _cifar10  # noqa: F401  (registers cifar10: torchvision's cifar-10-batches-py)
from scenarios.datasets import tiny_imagenet as _tiny_imagenet  # noqa: F401  (registers tiny-imagenet: tiny-imagenet-200/)
from scenarios.datasets import fashion_mnist as _fashion_mnist  # noqa: F401  (registers fashion-mnist: the idx.gz files)
from scenarios.kinds.builders import class_incremental, class_order, domain_incremental, task_splits
from scenarios.config import as_dict, check_choice, get_bool, get_int, get_str
from scenarios.datasets.base import (
    ImageFolderDataset,
    TargetSubset,
    TensorImageDataset,
    load_digits_dataset,
    make_synthetic,
    read_imagefolder_split,
)
from scenarios.datasets.registry import DATASETS, LoadedData, get_loader, register_dataset, resolve_data_root

BUILD_KINDS = ("class_il", "task_il", "domain_il")
# Kinds with a builder of their own: "module:function(cfg, data_root) -> Stream", imported when used.
KIND_BUILDERS: dict[str, str] = {
    "fscil": "scenarios.kinds.fscil:build_fscil",
    "tta": "scenarios.kinds.tta:build_tta",
    "union_label": "scenarios.kinds.union_label:build_union_label",
    "forgetting": "scenarios.kinds.forgetting:build_forgetting",
    "text": "scenarios.kinds.text:build_text",
}
# Datasets that come with their own stream builder (same signature), whatever the kind.
DATASET_BUILDERS: dict[str, str] = {
    "avalanche": "scenarios.datasets.avalanche_benchmarks:build_avalanche",
}
DEFAULT_CLASS_ORDER_SEED = 1993  # the PILOT family's seed

__all__ = [
    "BUILD_KINDS", "DATASETS", "ImageFolderDataset", "LoadedData", "TargetSubset", "TensorImageDataset",
    "build", "class_incremental", "class_order", "domain_incremental", "load_digits_dataset", "make_synthetic",
    "read_imagefolder_split", "register_dataset", "resolve_data_root", "task_splits",
]


def build(cfg: Any, data_root: str | Path | None = None) -> Stream:
    """The stream a scenario config describes; names are checked before any data is read."""
    cfg = as_dict(cfg)
    dataset = get_str(cfg, "dataset")
    kind = get_str(cfg, "kind", "class_il")
    check_choice("scenario kind", kind, (*BUILD_KINDS, *KIND_BUILDERS))
    if dataset in DATASET_BUILDERS:  # a whole stream made elsewhere, e.g. Avalanche's benchmark generators
        from cl.engine.lazy import load

        stream = load(DATASET_BUILDERS[dataset])(cfg, data_root)
        if stream.info.kind != kind:
            raise ConfigError(f"scenario '{dataset}' built a {stream.info.kind} stream, not {kind}: "
                              f"set scenario.kind={stream.info.kind}")
        return stream
    if kind in KIND_BUILDERS:  # e.g. fscil: a base session plus N-way K-shot sessions
        from cl.engine.lazy import load

        return load(KIND_BUILDERS[kind])(cfg, data_root)
    loader = get_loader(dataset)
    name = get_str(cfg, "name", None) or dataset
    seed = get_int(cfg, "class_order_seed", DEFAULT_CLASS_ORDER_SEED)
    limit = get_int(cfg, "limit_per_class", None, minimum=1)
    if kind != "domain_il":
        init_cls, increment = _increments(cfg)
    data = loader({**cfg, "name": name}, resolve_data_root(data_root))
    from cl.engine.cache import attach_image_cache  # scenario.image_cache: decode-once uint8 cache (issue 10)

    attach_image_cache((data.train, data.test), cfg)
    if kind == "domain_il":
        if data.domains_train is None or data.domains_test is None:
            raise ConfigError(
                f"dataset '{dataset}' has no domains, so it cannot make a domain_il stream "
                "(use a multi-domain dataset, e.g. synthetic with synthetic.n_domains > 1)"
            )
        return domain_incremental(
            data.train, data.test, name=name, domains_train=data.domains_train, domains_test=data.domains_test,
            seed=seed, domain_order=cfg.get("domain_order"), limit_per_class=limit,
        )
    return class_incremental(
        data.train, data.test, name=name, init_cls=init_cls, increment=increment, seed=seed,
        shuffle=get_bool(cfg, "shuffle", True), kind=kind, limit_per_class=limit,
    )


def _increments(cfg: dict) -> tuple[int, int]:
    """(init_cls, increment); either one alone means equal-sized tasks."""
    init_cls = get_int(cfg, "init_cls", None, minimum=1)
    increment = get_int(cfg, "increment", None, minimum=1)
    if init_cls is None and increment is None:
        raise ConfigError("a class_il/task_il scenario needs 'init_cls' and 'increment' (classes per experience)")
    return (init_cls or increment), (increment or init_cls)


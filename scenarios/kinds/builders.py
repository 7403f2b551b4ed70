"""Turn a labelled (train, test) pair into a `Stream`: class order, task sizes and per-experience views.

Labels are never remapped: a sample's global class id is its dataset label, and `StreamInfo.class_order`
records the order in which classes arrive. Samples are chosen through the `targets` arrays only, so building a
stream over 100k files decodes no image.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset

from cl.engine.errors import ConfigError, DatasetError
from cl.engine.stream import Experience, Stream, StreamInfo
from cl.engine.in_memory import input_shape_of
from cl.engine.subset import TargetSubset

CLASS_KINDS = ("class_il", "task_il")


def class_order(n_classes: int, seed: int, shuffle: bool = True) -> list[int]:
    """PILOT's `np.random.seed(seed); np.random.permutation(n)`, from a local generator (same numbers, no global
    state touched); the identity when not shuffled."""
    if not shuffle:
        return list(range(n_classes))
    return np.random.RandomState(seed).permutation(n_classes).tolist()


def task_splits(n: int, init_cls: int, increment: int) -> list[int]:
    """Classes per experience: `[init_cls, increment, ...]`, a remainder becoming a last, smaller task (PILOT)."""
    for key, value in (("n_classes", n), ("init_cls", init_cls), ("increment", increment)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if init_cls > n:
        raise ConfigError(f"init_cls={init_cls} is larger than the dataset's {n} classes")
    sizes = [int(init_cls)]
    while sum(sizes) + increment < n:
        sizes.append(int(increment))
    if n - sum(sizes) > 0:
        sizes.append(n - sum(sizes))
    return sizes


def class_incremental(
    train: Dataset,
    test: Dataset,
    *,
    name: str,
    init_cls: int,
    increment: int,
    seed: int,
    shuffle: bool = True,
    kind: str = "class_il",
    limit_per_class: int | None = None,
) -> Stream:
    """One experience per block of classes in class order; `task_id` is the experience index (used by task-IL)."""
    if kind not in CLASS_KINDS:
        raise ConfigError(f"class_incremental builds {' or '.join(CLASS_KINDS)}, not {kind!r}")
    train_targets, test_targets = _targets(train, "train"), _targets(test, "test")
    n_classes = _n_classes(name, train, train_targets, test_targets)
    order = class_order(n_classes, seed, shuffle)
    sizes = task_splits(n_classes, init_cls, increment)
    train_keep = _first_per_class(train_targets, limit_per_class)
    test_keep = _first_per_class(test_targets, limit_per_class)
    experiences, start = [], 0
    for i, size in enumerate(sizes):
        classes = order[start : start + size]
        start += size
        train_idx = np.flatnonzero(np.isin(train_targets, classes) & train_keep)
        test_idx = np.flatnonzero(np.isin(test_targets, classes) & test_keep)
        _require_samples(name, f"experience {i} (classes {classes})", train_idx, test_idx)
        experiences.append(Experience(
            index=i, train=TargetSubset(train, train_idx), test=TargetSubset(test, test_idx),
            classes=list(classes), kind=kind, task_id=i,
        ))
    info = StreamInfo(
        name=name, kind=kind, n_classes=n_classes, n_experiences=len(experiences), class_order=order,
        class_names=_class_names(train), input_shape=input_shape_of(train),
        classes_per_experience=[list(e.classes) for e in experiences],
        extra={"class_order_seed": seed, "shuffle": bool(shuffle), "increments": sizes,
               "limit_per_class": limit_per_class, **_sizes(experiences)},
    )
    return Stream(experiences, info, _protocol(kind))


def _protocol(kind: str):
    """The evaluation protocol the kind's record declares (task_il: scored with task ids)."""
    from scenarios import get_kind

    return get_kind(kind).protocol


def domain_incremental(
    train: Dataset,
    test: Dataset,
    *,
    name: str,
    domains_train: Sequence | np.ndarray,
    domains_test: Sequence | np.ndarray,
    seed: int,
    domain_order: Sequence | None = None,
    limit_per_class: int | None = None,
) -> Stream:
    """One experience per domain (sorted ids unless `domain_order` is given), each over all classes.

    `seed` only records provenance: the domain order is fixed, as in the domain-IL references.
    """
    train_targets, test_targets = _targets(train, "train"), _targets(test, "test")
    domains_train, domains_test = np.asarray(domains_train).reshape(-1), np.asarray(domains_test).reshape(-1)
    if len(domains_train) != len(train_targets) or len(domains_test) != len(test_targets):
        raise DatasetError(f"{name}: the domain ids do not match the samples one to one")
    present = np.unique(domains_train).tolist()
    if domain_order is None:
        order = present
    else:
        order = list(domain_order)
        unknown = [d for d in order if d not in present]
        if unknown or len(set(order)) != len(order):
            raise ConfigError(f"{name}: domain_order {order} must list distinct domains among {present}")
    n_classes = _n_classes(name, train, train_targets, test_targets)
    all_classes = list(range(n_classes))
    experiences = []
    for i, domain in enumerate(order):
        train_idx = _limited(np.flatnonzero(domains_train == domain), train_targets, limit_per_class)
        test_idx = _limited(np.flatnonzero(domains_test == domain), test_targets, limit_per_class)
        _require_samples(name, f"domain {domain!r}", train_idx, test_idx)
        experiences.append(Experience(
            index=i, train=TargetSubset(train, train_idx), test=TargetSubset(test, test_idx),
            classes=list(all_classes), kind="domain_il", task_id=0, domain=_plain(domain),
        ))
    info = StreamInfo(
        name=name, kind="domain_il", n_classes=n_classes, n_experiences=len(experiences),
        class_order=list(all_classes), class_names=_class_names(train), input_shape=input_shape_of(train),
        classes_per_experience=[list(all_classes) for _ in experiences],
        extra={"seed": seed, "domain_order": [_plain(d) for d in order],
               "limit_per_class": limit_per_class, **_sizes(experiences)},
    )
    return Stream(experiences, info, _protocol("domain_il"))


def _targets(dataset: Dataset, split: str) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise TypeError(f"the {split} dataset has no `targets` array (see the contract in scenarios/datasets/base.py)")
    return np.asarray(targets, dtype=np.int64).reshape(-1)


def _n_classes(name: str, train: Dataset, train_targets: np.ndarray, test_targets: np.ndarray) -> int:
    """The label space size: `len(class_names)` when named, else the largest label + 1."""
    labels = np.concatenate([train_targets, test_targets])
    if len(labels) == 0:
        raise DatasetError(f"{name}: the dataset has no samples")
    if labels.min() < 0:
        raise DatasetError(f"{name}: labels must be 0..K-1, found {labels.min()}")
    names = _class_names(train)
    n = len(names) if names else int(labels.max()) + 1
    if labels.max() >= n:
        raise DatasetError(f"{name}: label {labels.max()} is out of range for {n} class names")
    return n


def _class_names(dataset: Dataset) -> list[str] | None:
    names = getattr(dataset, "class_names", None)
    return list(names) if names is not None else None


def _first_per_class(targets: np.ndarray, limit: int | None) -> np.ndarray:
    """Mask keeping the first `limit` samples (in dataset order) of every class; all when `limit` is None."""
    if limit is None:
        return np.ones(len(targets), dtype=bool)
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise ConfigError(f"limit_per_class must be a positive integer or null, got {limit!r}")
    by_class = np.argsort(targets, kind="stable")
    sorted_targets = targets[by_class]
    rank = np.empty(len(targets), dtype=np.int64)
    rank[by_class] = np.arange(len(targets)) - np.searchsorted(sorted_targets, sorted_targets, side="left")
    return rank < limit


def _limited(indices: np.ndarray, targets: np.ndarray, limit: int | None) -> np.ndarray:
    return indices[_first_per_class(targets[indices], limit)]


def _require_samples(name: str, what: str, train_idx: np.ndarray, test_idx: np.ndarray) -> None:
    for split, idx in (("train", train_idx), ("test", test_idx)):
        if len(idx) == 0:
            raise DatasetError(f"{name}: {what} has no {split} samples; check the dataset's {split} split")


def _sizes(experiences: list[Experience]) -> dict:
    return {"n_train": [len(e.train) for e in experiences], "n_test": [len(e.test) for e in experiences]}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, so domains serialise to JSON."""
    return value.item() if isinstance(value, np.generic) else value

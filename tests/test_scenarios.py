"""Scenario builders: PILOT's class order and task sizes, stream structure, the bundled datasets, config errors."""
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import scenarios
from cl.engine.errors import ConfigError
from scenarios import class_incremental, class_order, make_synthetic, task_splits
from scenarios.datasets.base import TensorImageDataset, load_digits_dataset

pytestmark = pytest.mark.unit


def pilot_order(n, seed):
    """PILOT's utils/data_manager.py, global seed and all (the global state is restored afterwards)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n).tolist()
    finally:
        np.random.set_state(state)


@pytest.mark.parametrize("n", [10, 100, 200])
def test_class_order_equals_pilot_global_seed_permutation(n):
    assert class_order(n, 1993) == pilot_order(n, 1993)


def test_class_order_identity_without_shuffle():
    assert class_order(7, 1993, shuffle=False) == list(range(7))


@pytest.mark.parametrize(
    "n, init_cls, increment, expected",
    [(10, 4, 4, [4, 4, 2]), (10, 2, 2, [2] * 5), (100, 10, 10, [10] * 10), (10, 5, 3, [5, 3, 2]), (10, 10, 5, [10])],
)
def test_task_splits_pilot_sizes_with_remainder(n, init_cls, increment, expected):
    assert task_splits(n, init_cls, increment) == expected


@pytest.mark.parametrize("n, init_cls, increment", [(10, 11, 2), (10, 2, 0), (10, 0, 2), (10, 2, -1), (0, 1, 1)])
def test_task_splits_rejects_invalid_sizes(n, init_cls, increment):
    with pytest.raises(ConfigError):
        task_splits(n, init_cls, increment)


@pytest.fixture(scope="module")
def digits_stream():
    return scenarios.build({"dataset": "digits", "init_cls": 2, "increment": 2, "class_order_seed": 1993})


def test_digits_stream_structure_and_counts(digits_stream):
    train, test = load_digits_dataset()
    assert (len(train), len(test)) == (1437, 360)
    assert len(digits_stream) == 5
    info = digits_stream.info
    assert info.n_classes == 10 and info.n_experiences == 5 and info.kind == "class_il"
    assert info.class_order == pilot_order(10, 1993)
    assert info.class_names == [str(c) for c in range(10)]
    assert tuple(info.input_shape) == (1, 8, 8)
    assert info.classes_per_experience == [e.classes for e in digits_stream]
    for i, exp in enumerate(digits_stream):
        assert exp.classes == info.class_order[2 * i : 2 * i + 2]
        assert exp.task_id == i and exp.index == i
        assert len(exp.train) == int(np.isin(train.targets, exp.classes).sum())
        assert len(exp.test) == int(np.isin(test.targets, exp.classes).sum())
    assert sum(len(e.train) for e in digits_stream) == len(train)
    assert sum(len(e.test) for e in digits_stream) == len(test)
    x, y = digits_stream[0].train[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 8, 8) and isinstance(y, int)
    assert int(x.max()) <= 255 and int(x.max()) > 16  # scaled from 0..16


def test_digits_split_does_not_depend_on_run_seed():
    a = scenarios.build({"dataset": "digits", "increment": 5, "class_order_seed": 1})
    b = scenarios.build({"dataset": "digits", "increment": 5, "class_order_seed": 2})
    assert np.array_equal(a[0].test.dataset.targets, b[0].test.dataset.targets)
    assert torch.equal(a[0].test.dataset.images, b[0].test.dataset.images)


def test_experiences_partition_classes_and_labels_are_not_remapped(digits_stream):
    all_classes = [c for e in digits_stream for c in e.classes]
    assert sorted(all_classes) == list(range(10))
    for exp in digits_stream:
        assert set(exp.train.targets.tolist()) == set(exp.classes)
        assert set(exp.test.targets.tolist()) <= set(exp.classes)
        base = exp.train.dataset
        for i in range(0, len(exp.train), 37):
            x, y = exp.train[i]
            j = exp.train.indices[i]
            assert y == base.targets[j] and torch.equal(x, base.images[j])  # global id = dataset label


def test_slicing_keeps_first_experiences_and_union_of_classes(digits_stream):
    head = digits_stream[:3]
    assert len(head) == 3
    assert head.classes() == [c for e in digits_stream.experiences[:3] for c in e.classes]
    assert len(head.test_union()) == sum(len(e.test) for e in head)


def test_task_il_same_split_with_task_ids(digits_stream):
    task = scenarios.build({"dataset": "digits", "kind": "task_il", "init_cls": 2, "increment": 2})
    assert task.kind == "task_il"
    assert [e.classes for e in task] == [e.classes for e in digits_stream]
    assert [e.task_id for e in task] == list(range(5))


def test_limit_per_class_keeps_first_samples():
    stream = scenarios.build({"dataset": "digits", "increment": 5, "limit_per_class": 3})
    train, _ = load_digits_dataset()
    for exp in stream:
        for split in (exp.train, exp.test):
            counts = np.bincount(split.targets, minlength=10)
            assert all(counts[c] == 3 for c in exp.classes)
        for c in exp.classes:
            first = np.flatnonzero(train.targets == c)[:3]
            assert np.array_equal(exp.train.indices[exp.train.targets == c], first)


def test_omegaconf_config_and_unknown_fields_are_accepted():
    cfg = OmegaConf.create({"dataset": "digits", "init_cls": 4, "increment": 3, "shuffle": False, "epochs": 9})
    stream = scenarios.build(cfg)
    assert [e.classes for e in stream] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert stream.info.class_order == list(range(10))


def test_unknown_dataset_suggests_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'digits'") as err:
        scenarios.build({"dataset": "digts", "increment": 2})
    assert "synthetic" in str(err.value) and "imagefolder" in str(err.value)


def test_unknown_kind_suggests_closest_name():
    with pytest.raises(ConfigError, match="did you mean 'class_il'"):
        scenarios.build({"dataset": "digits", "kind": "clas_il", "increment": 2})


def test_missing_increments_and_domainless_domain_il_are_config_errors():
    with pytest.raises(ConfigError, match="init_cls"):
        scenarios.build({"dataset": "digits"})
    with pytest.raises(ConfigError, match="no domains"):
        scenarios.build({"dataset": "digits", "kind": "domain_il"})


def test_synthetic_is_fast_deterministic_and_seeded():
    start = time.perf_counter()
    train, test = make_synthetic()
    assert time.perf_counter() - start < 1.0
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape) == (600, 3, 32, 32)
    assert len(test) == 200 and np.bincount(train.targets).tolist() == [60] * 10
    again, _ = make_synthetic()
    other, _ = make_synthetic(seed=1)
    assert torch.equal(train.images, again.images) and np.array_equal(train.targets, again.targets)
    assert not torch.equal(train.images, other.images)


def test_synthetic_nearest_class_mean_on_raw_pixels_beats_chance():
    train, test = make_synthetic(n_classes=10, n_domains=1)
    x_train = train.images.flatten(1).double()
    means = torch.stack([x_train[torch.as_tensor(train.targets == c)].mean(0) for c in range(10)])
    predicted = torch.cdist(test.images.flatten(1).double(), means).argmin(1).numpy()
    assert (predicted == test.targets).mean() > 0.6


def test_synthetic_domain_il_has_every_class_per_domain_and_distinct_styles():
    stream = scenarios.build({"dataset": "synthetic", "kind": "domain_il", "synthetic": {"n_domains": 3}})
    assert len(stream) == 3 and stream.kind == "domain_il"
    assert [e.domain for e in stream] == [0, 1, 2]
    channel_means = []
    for exp in stream:
        assert exp.classes == list(range(10))
        assert set(exp.train.targets.tolist()) == set(range(10)) == set(exp.test.targets.tolist())
        assert set(exp.train.domains.tolist()) == {exp.domain}
        images = torch.stack([exp.train[i][0] for i in range(len(exp.train))]).double()
        channel_means.append(images.mean((0, 2, 3)))
    for a in range(3):
        for b in range(a + 1, 3):
            assert (channel_means[a] - channel_means[b]).abs().max() > 10  # on the 0..255 scale


def test_synthetic_domain_il_limit_per_class_is_per_domain():
    cfg = {"dataset": "synthetic", "kind": "domain_il", "limit_per_class": 2, "synthetic": {"n_domains": 2}}
    for exp in scenarios.build(cfg):
        assert np.bincount(exp.train.targets).tolist() == [2] * 10


def test_class_incremental_on_unnamed_tensor_dataset():
    images = torch.zeros(12, 1, 4, 4, dtype=torch.uint8)
    train = TensorImageDataset(images, np.arange(12) % 6)
    stream = class_incremental(train, train, name="toy", init_cls=3, increment=2, seed=0)
    assert stream.info.n_classes == 6 and [len(e.classes) for e in stream] == [3, 2, 1]
    assert stream.info.class_names is None

"""clbench <-> Avalanche: `scenario=avalanche/<benchmark>` (Avalanche's generators as clbench streams) and
`cl.engine.interop.to_avalanche` (clbench streams as Avalanche benchmarks), on tiny data the tests write."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

pytest.importorskip("avalanche", reason="the optional extra `avalanche` is not installed: pip install -e .[avalanche]")

from cl.engine.errors import DatasetError  # noqa: E402
from cl.engine.interop import from_avalanche, to_avalanche  # noqa: E402
from scenarios import build, class_order  # noqa: E402

pytestmark = pytest.mark.unit

PER_CLASS_TRAIN, PER_CLASS_TEST = 12, 4


def _write_idx(path, array: np.ndarray) -> None:
    """MNIST's idx format: magic (0x08 = ubyte, number of dims), big-endian int32 sizes, then the bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """<data_root>/mnist/MNIST/raw/ in torchvision's layout: a few 28x28 images per digit, a digit's class shown
    as a bright band at a class-specific row so that a small model can learn it."""
    raw = tmp_path / "data" / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", PER_CLASS_TRAIN), ("t10k", PER_CLASS_TEST)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 40, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 4 + 2 * c, :] = 255
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "data"


def test_split_mnist_uses_clbench_class_order_and_original_labels(compose, tiny_mnist):
    cfg = compose("scenario=avalanche/split-mnist", f"data_root={tiny_mnist}")
    stream = build(cfg["scenario"], cfg["data_root"])
    order = class_order(10, cfg["seed"], True)
    assert stream.info.kind == "class_il" and len(stream) == 5 and stream.info.class_order == order
    for i, exp in enumerate(stream):
        assert exp.classes == order[2 * i: 2 * i + 2] and exp.task_id == i
        assert set(exp.train.targets.tolist()) == set(exp.classes) == set(exp.test.targets.tolist())
        assert len(exp.train) == 2 * PER_CLASS_TRAIN and len(exp.test) == 2 * PER_CLASS_TEST
        x, y = exp.train[0]
        assert x.shape == (1, 28, 28) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and y in exp.classes


def test_permuted_mnist_is_domain_incremental(compose, tiny_mnist):
    cfg = compose("scenario=avalanche/permuted-mnist", f"data_root={tiny_mnist}", "scenario.n_experiences=3")
    stream = build(cfg["scenario"], cfg["data_root"])
    assert stream.info.kind == "domain_il" and len(stream) == 3
    assert all(exp.classes == list(range(10)) and exp.task_id == 0 for exp in stream)
    # the same image under two permutations: same pixels, different places
    a, b = stream[0].train[0][0], stream[1].train[0][0]
    assert torch.equal(a.flatten().sort().values, b.flatten().sort().values) and not torch.equal(a, b)


def test_missing_data_is_one_line_listing_the_expected_tree(compose, tmp_path):
    cfg = compose("scenario=avalanche/split-mnist", f"data_root={tmp_path / 'nothing'}")
    with pytest.raises(DatasetError) as err:
        build(cfg["scenario"], cfg["data_root"])
    msg = str(err.value)
    assert "\n" not in msg and "MNIST/raw/train-images-idx3-ubyte" in msg and "allow_download=true" in msg


@pytest.mark.parametrize("scenario", ["digits", "synthetic-task"])
def test_a_clbench_stream_round_trips_through_avalanche(compose, scenario):
    cfg = compose(f"scenario={scenario}", "scenario.limit_per_class=6")
    stream = build(cfg["scenario"], cfg["data_root"])
    bench = to_avalanche(stream)
    assert len(bench.train_stream) == len(bench.test_stream) == len(stream)
    if stream.info.kind == "task_il":  # Avalanche sees the task labels
        assert [e.task_label for e in bench.train_stream] == [e.task_id for e in stream]
    back = from_avalanche(bench, name=stream.info.name, kind=stream.info.kind, n_classes=stream.info.n_classes)
    assert back.info.classes_per_experience == stream.info.classes_per_experience
    for mine, theirs in zip(stream, back):
        assert mine.task_id == theirs.task_id and mine.classes == theirs.classes
        for split in ("train", "test"):
            a, b = getattr(mine, split), getattr(theirs, split)
            assert len(a) == len(b)
            for i in range(len(a)):
                (xa, ya), (xb, yb) = a[i], b[i]
                assert int(ya) == yb and torch.equal(torch.as_tensor(xa), torch.as_tensor(xb))


@pytest.mark.e2e
def test_native_and_avalanche_strategies_run_on_an_avalanche_benchmark(compose, run_quiet, tiny_mnist):
    for strategy in ("finetune", "avalanche/naive"):
        path, _ = run_quiet(compose(f"strategy={strategy}", "scenario=avalanche/split-mnist", "debug=fast",
                                    "scenario.limit_per_class=4", f"data_root={tiny_mnist}"))
        result = json.loads(path.read_text())
        assert result["status"] == "finished" and result["scenario"] == "avalanche/split_mnist"
        assert result["stream"]["extra"]["generator"] == "SplitMNIST"

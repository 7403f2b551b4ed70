"""Fashion-MNIST: the idx reader on tiny files this test writes, the split streams (PILOT-style seeded class order,
class- and task-incremental), where the files are looked for, and the missing-data error naming the apt package."""
import gzip
import struct

import numpy as np
import pytest

from cl.engine.errors import DatasetError

pytestmark = pytest.mark.unit


def write_idx(path, array, gz=True):
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def make_tiny(folder, per_class=3, gz=True):
    """A Fashion-MNIST-shaped set: pixel value = 10 * label + index within the class (recognisable on read)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        labels = np.repeat(np.arange(10), per_class)
        images = np.zeros((len(labels), 28, 28), np.uint8)
        for i, y in enumerate(labels):
            images[i] = 10 * y + i % per_class
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{stem}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(folder / f"{stem}-labels-idx1-ubyte{suffix}", labels, gz)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reader_reads_tiny_idx_files(tmp_path, gz):
    from scenarios.datasets.fashion_mnist import CLASS_NAMES, load_fashion_mnist

    want = make_tiny(tmp_path / "fashion-mnist", gz=gz)
    data = load_fashion_mnist({}, tmp_path)
    for ds, (images, labels) in ((data.train, want["train"]), (data.test, want["test"])):
        assert tuple(ds.images.shape) == (30, 1, 28, 28) and str(ds.images.dtype) == "torch.uint8"
        assert np.array_equal(ds.images[:, 0].numpy(), images) and np.array_equal(ds.targets, labels)
        assert ds.class_names == CLASS_NAMES


def test_class_and_task_incremental_streams_follow_the_seeded_order(tmp_path):
    import scenarios

    make_tiny(tmp_path / "fashion-mnist")
    for kind in ("class_il", "task_il"):
        stream = scenarios.build({"dataset": "fashion-mnist", "kind": kind, "init_cls": 2, "increment": 2,
                                  "shuffle": True, "class_order_seed": 1993}, data_root=tmp_path)
        order = np.random.RandomState(1993).permutation(10).tolist()  # PILOT: np.random.seed(1993); permutation
        assert stream.info.class_order == order and stream.info.kind == kind
        assert [e.classes for e in stream] == [order[i:i + 2] for i in range(0, 10, 2)]
        assert [e.task_id for e in stream] == [0, 1, 2, 3, 4]
        for e in stream:
            assert sorted({int(y) for _, y in e.train}) == sorted(e.classes) and len(e.test) == 6


def test_scenario_configs_compose(compose):
    cfg = compose("scenario=fashion-mnist")
    assert cfg["scenario"]["dataset"] == "fashion-mnist" and cfg["backbone"]["name"] == "efficientnet-lite0"
    assert cfg["backbone"]["input_size"] == 64
    assert compose("scenario=fashion-mnist-til")["scenario"]["kind"] == "task_il"


def test_root_option_and_plain_data_root(tmp_path):
    from scenarios.datasets.fashion_mnist import load_fashion_mnist

    make_tiny(tmp_path / "elsewhere" / "fm", per_class=2)
    assert len(load_fashion_mnist({"root": "elsewhere/fm"}, tmp_path).train) == 20  # relative to the data root
    assert len(load_fashion_mnist({"root": str(tmp_path / "elsewhere" / "fm")}, tmp_path / "x").test) == 20


def test_missing_data_names_the_apt_package(tmp_path, monkeypatch):
    import scenarios.datasets.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_ROOT", tmp_path / "no-debian")
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist") as e:
        fm.load_fashion_mnist({}, tmp_path)
    assert "\n" not in str(e.value)


def test_bad_files_fail_with_one_line(tmp_path):
    from scenarios.datasets.fashion_mnist import load_fashion_mnist

    folder = tmp_path / "fashion-mnist"
    make_tiny(folder)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(DatasetError, match="truncated"):
        load_fashion_mnist({}, tmp_path)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04 not idx"))
    with pytest.raises(DatasetError, match="not an unsigned-byte idx file"):
        load_fashion_mnist({}, tmp_path)


def test_the_debian_files_when_installed():
    from pathlib import Path

    from scenarios.datasets.fashion_mnist import DEBIAN_ROOT, load_fashion_mnist

    if not (DEBIAN_ROOT / "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip("apt-get install dataset-fashion-mnist (CI installs it)")
    data = load_fashion_mnist({}, Path("/nonexistent"))
    assert len(data.train) == 60000 and len(data.test) == 10000
    assert np.bincount(data.train.targets).tolist() == [6000] * 10
    assert np.bincount(data.test.targets).tolist() == [1000] * 10

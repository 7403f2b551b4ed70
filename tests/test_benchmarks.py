"""The real class-incremental benchmarks on tiny copies in their real layouts: CIFAR-100's safe pickle reader, the
ImageFolder benchmarks (IN-R, IN-A, CUB, ObjectNet, OmniBenchmark, VTAB), PILOT's class order and every config."""
import io
import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import scenarios
from cl.app.cli import compose_config
from cl.engine.errors import DatasetError
from scenarios.datasets.benchmarks import IMAGEFOLDER_BENCHMARKS
from scenarios.datasets.cifar import read_cifar100, safe_load

pytestmark = pytest.mark.unit

SIZE = 32  # image_size override: keeps the transforms cheap
FOLDER_CLASSES = {"imagenet-r": 200, "imagenet-a": 200, "cub": 200, "objectnet": 200, "omnibenchmark": 300, "vtab": 50}
# config -> (dataset, classes, init_cls, increment, shuffle)
CONFIGS = {
    "cifar100": ("cifar100", 100, 10, 10, True),
    "imagenet-r": ("imagenet-r", 200, 20, 20, True),
    "imagenet-a": ("imagenet-a", 200, 20, 20, True),
    "cub": ("cub", 200, 10, 10, True),
    "objectnet": ("objectnet", 200, 20, 20, True),
    "omnibenchmark": ("omnibenchmark", 300, 30, 30, True),
    "vtab": ("vtab", 50, 10, 10, False),
    "cifar100-b0inc5": ("cifar100", 100, 5, 5, True),
    "cifar100-b0inc10": ("cifar100", 100, 10, 10, True),
    "imagenet-r-b0inc5": ("imagenet-r", 200, 5, 5, True),
    "imagenet-r-b0inc10": ("imagenet-r", 200, 10, 10, True),
    "imagenet-r-b0inc20": ("imagenet-r", 200, 20, 20, True),
    "imagenet-a-b0inc10": ("imagenet-a", 200, 10, 10, True),
    "imagenet-a-b0inc20": ("imagenet-a", 200, 20, 20, True),
    "cub-b0inc10": ("cub", 200, 10, 10, True),
    "objectnet-b0inc10": ("objectnet", 200, 10, 10, True),
    "objectnet-b0inc20": ("objectnet", 200, 20, 20, True),
    "omnibenchmark-b0inc20": ("omnibenchmark", 300, 20, 20, True),
    "omnibenchmark-b0inc30": ("omnibenchmark", 300, 30, 30, True),
    "vtab-b0inc10": ("vtab", 50, 10, 10, False),
}


def pilot_order(n, seed=1993):
    """Exactly PILOT's `np.random.seed(seed); np.random.permutation(n)` (global state restored afterwards)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n).tolist()
    finally:
        np.random.set_state(state)


# --- tiny copies in the real layouts ---------------------------------------------------------------------------

def tiny_jpeg(color=(200, 30, 60)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def write_folder_tree(root, n_classes, per_split=1):
    """root/train|test/c000/0.jpg ...: n_classes folders, `per_split` tiny JPEGs each."""
    blob = tiny_jpeg()
    for split in ("train", "test"):
        for c in range(n_classes):
            folder = root / split / f"c{c:03d}"
            folder.mkdir(parents=True)
            for i in range(per_split):
                (folder / f"{i}.jpg").write_bytes(blob)
    return root


def cifar_dicts(per_class=(2, 1), seed=0):
    """train/test/meta dicts shaped like torchvision's cifar-100-python files read with encoding='bytes'."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in zip(("train", "test"), per_class):
        labels = [c for c in range(100) for _ in range(n)]
        out[split] = {
            b"filenames": [f"img_{split}_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": labels,
            b"coarse_labels": [c // 5 for c in labels],
            b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
        }
    out["meta"] = {
        b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
        b"coarse_label_names": [f"super{c:02d}".encode() for c in range(20)],
    }
    return out


def write_cifar(data_root, dicts=None, dump=pickle.dump):
    folder = data_root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    dicts = dicts or cifar_dicts()
    for name, d in dicts.items():
        with open(folder / name, "wb") as f:
            dump(d, f)
    return folder


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One data root holding every benchmark at its default folder name, 1 image per class and split."""
    root = tmp_path_factory.mktemp("data")
    for bench, n in FOLDER_CLASSES.items():
        write_folder_tree(root / IMAGEFOLDER_BENCHMARKS[bench].folder, n)
    write_cifar(root)
    return root


def scenario_cfg(name, **overrides):
    cfg = compose_config([f"scenario={name}"])["scenario"]
    return {**cfg, "image_size": SIZE, **overrides}


# --- registry and configs --------------------------------------------------------------------------------------

def test_benchmarks_are_registered():
    assert {"cifar100", *FOLDER_CLASSES} <= set(scenarios.DATASETS)
    assert {b: IMAGEFOLDER_BENCHMARKS[b].n_classes for b in FOLDER_CLASSES} == FOLDER_CLASSES


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_composes_with_pilot_fields(name):
    dataset, _, init_cls, increment, shuffle = CONFIGS[name]
    cfg = compose_config([f"scenario={name}"])
    sc = cfg["scenario"]
    assert cfg["backbone"]["name"] == "vit-b16-in21k"
    assert (sc["name"], sc["dataset"], sc["kind"]) == (name, dataset, "class_il")
    assert (sc["init_cls"], sc["increment"], sc["shuffle"]) == (init_cls, increment, shuffle)
    assert sc["class_order_seed"] == cfg["seed"] == 1993
    assert (sc["image_size"], sc["augment"], sc["limit_per_class"]) == (224, "pilot", None)


def test_named_split_keeps_command_line_overrides():
    cfg = compose_config(["backbone=vit-b16", "scenario=imagenet-r-b0inc5", "seed=7", "scenario.root=/elsewhere"])
    assert cfg["backbone"]["name"] == "vit-b16"
    sc = cfg["scenario"]
    assert (sc["class_order_seed"], sc["root"], sc["init_cls"], sc["name"]) == (7, "/elsewhere", 5, "imagenet-r-b0inc5")
    assert compose_config(["scenario=vtab"])["scenario"]["shuffle"] is False


# --- streams: PILOT's class order and task count ---------------------------------------------------------------

def test_pilot_class_order_known_answer():
    assert pilot_order(100)[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # PyCIL/PILOT's CIFAR-100 order


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_builds_the_pilot_stream(name, data_root):
    _, n, init_cls, increment, shuffle = CONFIGS[name]
    stream = scenarios.build(scenario_cfg(name), data_root=data_root)
    order = pilot_order(n) if shuffle else list(range(n))
    info = stream.info
    assert info.n_classes == n and info.class_order == order
    assert info.n_experiences == 1 + math.ceil((n - init_cls) / increment)
    assert info.classes_per_experience[0] == order[:init_cls]
    assert info.classes_per_experience[1] == order[init_cls : init_cls + increment]
    assert info.input_shape == (3, SIZE, SIZE)
    first = stream.experiences[0]
    x, y = first.train[0]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, SIZE, SIZE) and y in order[:init_cls]
    assert set(first.test.targets.tolist()) == set(order[:init_cls])


def test_default_splits_have_the_papers_task_counts(data_root):
    counts = {name: scenarios.build(scenario_cfg(name), data_root=data_root).info.n_experiences
              for name in ("imagenet-r", "objectnet", "omnibenchmark", "vtab", "imagenet-r-b0inc5")}
    assert counts == {"imagenet-r": 10, "objectnet": 10, "omnibenchmark": 10, "vtab": 5, "imagenet-r-b0inc5": 40}


def test_root_overrides_the_folder(data_root):
    for root in ("cub", str(data_root / "cub")):  # relative to data_root, or absolute
        stream = scenarios.build(scenario_cfg("imagenet-r", root=root), data_root=data_root)
        assert stream.info.n_classes == 200
    assert stream.experiences[0].train.class_names[:2] == ["c000", "c001"]


# --- ImageFolder benchmarks: errors name the layout and the source ---------------------------------------------

@pytest.mark.parametrize("bench", sorted(FOLDER_CLASSES))
def test_missing_folder_names_layout_and_source(bench, tmp_path):
    with pytest.raises(DatasetError) as err:
        scenarios.build(scenario_cfg(bench), data_root=tmp_path)
    msg = str(err.value)
    assert "dataset folder not found" in msg and "expected layout" in msg and "train/" in msg and "test/" in msg
    assert f"{FOLDER_CLASSES[bench]} class folders" in msg
    assert "LAMDA-PILOT README (sun-hailong/LAMDA-PILOT)" in msg and "CL_DATA" in msg


def test_wrong_class_count_fails(tmp_path):
    write_folder_tree(tmp_path / "vtab", 49)
    with pytest.raises(DatasetError, match="has 49 class folders, expected 50") as err:
        scenarios.build(scenario_cfg("vtab"), data_root=tmp_path)
    assert "expected layout" in str(err.value) and "scenario=imagefolder" in str(err.value)


def test_empty_class_fails_with_layout(tmp_path):
    root = write_folder_tree(tmp_path / "vtab", 50)
    (root / "train" / "c007" / "0.jpg").unlink()
    with pytest.raises(DatasetError, match="hold no images") as err:
        scenarios.build(scenario_cfg("vtab"), data_root=tmp_path)
    assert "train/c007" in str(err.value) and "expected layout" in str(err.value) and "LAMDA-PILOT" in str(err.value)


# --- CIFAR-100 -------------------------------------------------------------------------------------------------

@pytest.fixture
def cifar_root(tmp_path):
    write_cifar(tmp_path)
    return tmp_path


def test_cifar_reads_real_format(cifar_root):
    dicts = cifar_dicts()
    train, test = read_cifar100(cifar_root, image_size=SIZE)
    assert (len(train), len(test)) == (200, 100)
    assert train.class_names == [f"class{c:02d}" for c in range(100)] == test.class_names
    assert train.targets.dtype == np.int64 and train.targets.tolist() == dicts["train"][b"fine_labels"]
    assert train.images.dtype == torch.uint8 and tuple(train.images.shape) == (200, 3, 32, 32)
    assert np.array_equal(train.images.numpy().reshape(200, -1), dicts["train"][b"data"])
    for ds in (train, test, train.eval_view()):
        x, y = ds[3]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, SIZE, SIZE) and y == ds.targets[3]
    view = train.eval_view()
    assert view is not train and view.images is train.images and torch.equal(view[5][0], view[5][0])
    assert test.eval_view() is test and torch.equal(test[5][0], test[5][0])


def test_cifar_eval_pixels_keep_channel_layout(cifar_root):
    # image_size 28: Resize(32) is the identity on 32 px, then CenterCrop(28) drops 2 px per side.
    _, test = read_cifar100(cifar_root, image_size=28)
    assert torch.equal(test[7][0], test.images[7][:, 2:30, 2:30])


def test_cifar_defaults_to_224_as_cifar224(cifar_root):
    cfg = compose_config(["scenario=cifar100-b0inc5"])["scenario"]
    stream = scenarios.build(cfg, data_root=cifar_root)
    assert stream.info.n_experiences == 20 and stream.info.class_order == pilot_order(100)
    assert stream.info.class_names[:2] == ["class00", "class01"]
    exp = stream.experiences[0]
    assert tuple(exp.train[0][0].shape) == (3, 224, 224) and tuple(exp.test[0][0].shape) == (3, 224, 224)


class _Py2StylePickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING), as the real files written by Python 2's cPickle hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_style_dump(obj, f):
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    f.write(buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))  # numpy 1.x's name


def test_cifar_reads_python2_pickles_with_numpy1_names(tmp_path):
    folder = write_cifar(tmp_path, dump=py2_style_dump)
    assert b"cnumpy.core.multiarray\n_reconstruct" in (folder / "train").read_bytes()
    train, _ = read_cifar100(tmp_path, image_size=SIZE)
    assert np.array_equal(train.images.numpy().reshape(200, -1), cifar_dicts()["train"][b"data"])
    assert train.class_names[99] == "class99"


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


@pytest.mark.parametrize("call", [os.system, eval], ids=["os.system", "eval"])
def test_cifar_refuses_code_in_pickles(call, cifar_root, tmp_path):
    marker = tmp_path / "pwned"
    payload = f"touch {marker}" if call is os.system else f"open({str(marker)!r}, 'w').close()"
    train_file = cifar_root / "cifar-100-python" / "train"
    with open(train_file, "wb") as f:
        pickle.dump({b"data": _Evil(call, payload), b"fine_labels": []}, f)
    with pytest.raises(DatasetError, match="refusing to unpickle") as err:
        safe_load(train_file)
    assert call.__name__ in str(err.value)
    with pytest.raises(DatasetError, match="refusing to unpickle"):
        scenarios.build(scenario_cfg("cifar100"), data_root=cifar_root)
    assert not marker.exists()


def test_cifar_missing_files_show_tree_and_download(tmp_path):
    with pytest.raises(DatasetError) as err:
        scenarios.build(scenario_cfg("cifar100"), data_root=tmp_path)
    msg = str(err.value)
    for text in ("cifar-100-python/", "train", "test", "meta", "CIFAR100(", "download=True", "CL_DATA"):
        assert text in msg
    folder = write_cifar(tmp_path)
    (folder / "meta").unlink()
    with pytest.raises(DatasetError, match="lacks .*meta"):
        read_cifar100(tmp_path, image_size=SIZE)


def test_cifar_root_may_name_the_folder_itself(cifar_root):
    train, _ = read_cifar100(cifar_root / "cifar-100-python", image_size=SIZE)
    assert len(train) == 200
    stream = scenarios.build(scenario_cfg("cifar100", root="cifar-100-python"), data_root=cifar_root)
    assert stream.info.n_classes == 100


def test_cifar_damaged_or_foreign_files_fail(tmp_path):
    dicts = cifar_dicts()
    folder = write_cifar(tmp_path, dicts)
    whole = (folder / "train").read_bytes()
    (folder / "train").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="damaged or truncated"):
        read_cifar100(tmp_path, image_size=SIZE)
    cases = [
        ({**dicts["train"], b"data": dicts["train"][b"data"].astype(np.float32)}, "uint8"),
        ({**dicts["train"], b"data": dicts["train"][b"data"][:, :1024]}, "3072"),
        ({k: v for k, v in dicts["train"].items() if k != b"fine_labels"}, "no 'fine_labels'"),
        ({**dicts["train"], b"fine_labels": [0] * 200}, "no images of 99 classes"),
    ]
    for train, expected in cases:
        write_cifar(tmp_path, {"train": train})
        with pytest.raises(DatasetError, match=expected):
            read_cifar100(tmp_path, image_size=SIZE)
    write_cifar(tmp_path, {"train": dicts["train"], "meta": {b"label_names": [b"a"] * 10}})
    with pytest.raises(DatasetError, match="no 'fine_label_names'"):
        read_cifar100(tmp_path, image_size=SIZE)

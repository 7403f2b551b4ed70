"""Split CIFAR-10 and Tiny-ImageNet readers on tiny fake trees in the real archives' layouts (no downloads)."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import scenarios
from cl.app.cli import compose_config
from cl.engine.errors import DatasetError
from scenarios.datasets.cifar10 import crop_flip, read_cifar10
from scenarios.datasets.tiny_imagenet import read_tiny_imagenet

pytestmark = pytest.mark.unit


def _cifar10_tree(root, per_class=2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [c for c in range(10) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:  # bytes keys, as the real (Python 2) pickles read with encoding=bytes
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return folder


def test_cifar10_reads_torchvision_layout_with_plane_order(tmp_path):
    folder = _cifar10_tree(tmp_path)
    train, test = read_cifar10(tmp_path)
    assert len(train) == 5 * 20 and len(test) == 20 and train.class_names[3] == "c3"
    raw = pickle.load(open(folder / "data_batch_1", "rb"))
    x, y = train[1]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and y == 0
    assert int(x[1, 0, 5]) == int(raw[b"data"][1, 1024 + 5])  # green plane, row 0, column 5
    assert torch.equal(test.eval_view()[0][0], test[0][0])


def test_cifar10_missing_files_name_the_tree(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py") as e:
        read_cifar10(tmp_path)
    assert "data_batch_1" in str(e.value) and "download=True" in str(e.value)
    folder = _cifar10_tree(tmp_path / "d")
    (folder / "test_batch").unlink()
    with pytest.raises(DatasetError, match="lacks .*test_batch"):
        read_cifar10(tmp_path / "d")


def test_crop_flip_keeps_shape_and_pixels():
    x = torch.arange(3 * 8 * 8, dtype=torch.uint8).reshape(3, 8, 8)
    torch.manual_seed(0)
    outs = [crop_flip(x, 2) for _ in range(20)]
    assert all(o.shape == x.shape for o in outs)
    assert any(not torch.equal(o, x) for o in outs)


def test_split_cifar10_scenario_builds_five_tasks_of_two(tmp_path):
    _cifar10_tree(tmp_path)
    cfg = compose_config(["scenario=split-cifar10", "backbone=resnet18-tiny", f"data_root={tmp_path}"])
    stream = scenarios.build(cfg["scenario"], cfg["data_root"])
    assert [e.classes for e in stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert len(stream[0].train) == 2 * 5 * 2


def _tiny_tree(root, wnids=("n01", "n02", "n03"), per_class=2):
    folder = root / "tiny-imagenet-200"
    lines = []
    for k, w in enumerate(wnids):
        d = folder / "train" / w / "images"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), (10 * k, i, 0)).save(d / f"{w}_{i}.JPEG")
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "images").mkdir(parents=True)
    for k, w in enumerate(wnids):
        Image.new("L", (64, 64), 7 * k).save(folder / "val" / "images" / f"val_{k}.JPEG")  # greyscale, as some are
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines[::-1]) + "\n")
    (folder / "wnids.txt").write_text("\n".join(wnids[::-1]) + "\n")
    return folder


def test_tiny_imagenet_reads_train_folders_and_val_annotations(tmp_path):
    _tiny_tree(tmp_path)
    train, test = read_tiny_imagenet(tmp_path, expected_classes=3)
    assert train.class_names == ["n01", "n02", "n03"] and len(train) == 6
    assert sorted(test.targets.tolist()) == [0, 1, 2]
    x, y = test[list(test.targets).index(2)]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8 and y == 2 and int(x[0, 0, 0]) in (13, 14, 15)
    with pytest.raises(DatasetError, match="expected 200"):
        read_tiny_imagenet(tmp_path)


def test_tiny_imagenet_missing_or_bad_tree_is_one_clear_error(tmp_path):
    with pytest.raises(DatasetError, match="tiny-imagenet-200") as e:
        read_tiny_imagenet(tmp_path)
    assert "val_annotations.txt" in str(e.value) and "tiny-imagenet-200.zip" in str(e.value)
    folder = _tiny_tree(tmp_path / "d")
    (folder / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="line 1"):
        read_tiny_imagenet(tmp_path / "d", expected_classes=3)


def test_tiny_imagenet_scenario_builds_with_64px_backbone(tmp_path):
    _tiny_tree(tmp_path, wnids=("a", "b", "c", "d"))
    cfg = compose_config(["scenario=tiny-imagenet", "backbone=resnet18-tiny", f"data_root={tmp_path}",
                          "scenario.n_classes=4", "scenario.init_cls=2", "scenario.increment=2"])
    assert cfg["backbone"]["input_size"] == 64
    stream = scenarios.build(cfg["scenario"], cfg["data_root"])
    assert [e.classes for e in stream] == [[0, 1], [2, 3]]

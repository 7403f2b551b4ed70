"""The generic `root/train|test/<class>/<images>` reader: shapes, transforms, and every error a user can fix."""
import numpy as np
import pytest
import torch
from PIL import Image

import scenarios
from cl.engine.errors import ConfigError, DatasetError
from cl.engine.stream import eval_view
from scenarios.datasets.base import ImageFolderDataset, read_imagefolder_split

pytestmark = pytest.mark.unit

CLASSES = ("cat", "dog", "fox")
SIZE = 32


def write_image(path, seed, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)  # 40x30 (width x height)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)


def make_tree(root, classes=CLASSES, n_train=3, n_test=2):
    seed = 0
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            for i in range(n):
                seed += 1
                write_image(root / split / cls / f"img{i}.jpg", seed)
    return root


@pytest.fixture
def tree(tmp_path):
    return make_tree(tmp_path / "toy")


def read(root, **kwargs):
    kwargs.setdefault("image_size", SIZE)
    return read_imagefolder_split(root, name="toy", **kwargs)


def test_reads_sorted_classes_and_uint8_items(tree):
    (tree / "train" / "dog" / "extra.PNG").parent.mkdir(exist_ok=True)
    write_image(tree / "train" / "dog" / "extra.PNG", 99, fmt="PNG")  # extensions are case-insensitive
    (tree / "train" / "dog" / "notes.txt").write_text("not an image, ignored")
    train, test = read(tree, expected_classes=3)
    assert train.class_names == list(CLASSES) == test.class_names
    assert (len(train), len(test)) == (10, 6)
    assert np.bincount(train.targets).tolist() == [3, 4, 3] and train.targets.dtype == np.int64
    for ds in (train, test):
        x, y = ds[0]
        assert x.dtype == torch.uint8 and tuple(x.shape) == (3, SIZE, SIZE) and y == 0
        assert ds.input_shape == (3, SIZE, SIZE)


def test_eval_view_is_deterministic_and_shares_samples(tree):
    train, test = read(tree)
    view = train.eval_view()
    assert view is not train and view.samples is train.samples and not view.train
    assert torch.equal(view[1][0], view[1][0])
    assert torch.equal(test[1][0], test[1][0])
    assert test.eval_view() is test
    x = ImageFolderDataset(tree / "test", image_size=SIZE, train=False)[0][0]
    assert torch.equal(x, test[0][0])


def test_dataloader_batches_views_across_workers(tree, tmp_path):
    cfg = {"dataset": "imagefolder", "root": str(tree), "image_size": SIZE, "increment": 2}
    stream = scenarios.build(cfg)
    loader = torch.utils.data.DataLoader(stream.train_union(), batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 9
    assert batches[0][0].dtype == torch.uint8 and tuple(batches[0][0].shape) == (4, 3, SIZE, SIZE)


def test_augment_none_trains_on_eval_transform(tree):
    train, _ = read(tree, augment="none")
    assert torch.equal(train[0][0], train[0][0]) and train.eval_view() is train


def test_unknown_augment_is_config_error(tree):
    with pytest.raises(ConfigError, match="pilot"):
        read(tree, augment="autoaugment")


def test_build_reads_root_under_data_root_and_forwards_eval_view(tree, tmp_path):
    cfg = {"name": "toy", "dataset": "imagefolder", "root": "toy", "n_classes": 3, "image_size": SIZE,
           "init_cls": 2, "increment": 1, "class_order_seed": 1993}
    stream = scenarios.build(cfg, data_root=tmp_path)
    assert len(stream) == 2 and stream.info.class_names == list(CLASSES)
    assert tuple(stream.info.input_shape) == (3, SIZE, SIZE)
    exp = stream[0]
    assert set(exp.train.targets.tolist()) == set(exp.classes)
    evaluated = eval_view(exp.train)
    assert evaluated.dataset.train is False and np.array_equal(evaluated.indices, exp.train.indices)
    assert torch.equal(evaluated[0][0], evaluated[0][0])


def test_build_falls_back_to_cl_data(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("CL_DATA", str(tmp_path))
    stream = scenarios.build({"dataset": "imagefolder", "root": "toy", "image_size": SIZE, "increment": 3})
    assert len(stream) == 1 and sorted(stream[0].classes) == [0, 1, 2]


def test_missing_root_shows_expected_tree_count_and_source(tmp_path):
    with pytest.raises(DatasetError) as err:
        read(tmp_path / "nowhere", expected_classes=200, source_hint="the PILOT README's Drive link")
    message = str(err.value)
    assert "not found" in message and str(tmp_path / "nowhere") in message
    for text in ("train/", "test/", "<class_a>/ img1.jpg", "200 class folders", "the PILOT README's Drive link"):
        assert text in message


def test_missing_root_through_build_names_the_data_root(tmp_path):
    cfg = {"dataset": "imagefolder", "root": "imagenet-r", "n_classes": 200, "increment": 20}
    with pytest.raises(DatasetError, match="CL_DATA") as err:
        scenarios.build(cfg, data_root=tmp_path)
    assert "<class_a>/" in str(err.value)


def test_missing_test_folder_shows_expected_tree(tmp_path):
    root = tmp_path / "toy"
    write_image(root / "train" / "cat" / "a.jpg", 1)
    with pytest.raises(DatasetError, match="no test/ folder") as err:
        read(root)
    assert "<class_a>/" in str(err.value)


def test_wrong_class_count(tree):
    with pytest.raises(DatasetError, match="has 3 class folders, expected 200"):
        read(tree, expected_classes=200)


def test_train_and_test_class_folders_differ(tree):
    write_image(tree / "train" / "owl" / "a.jpg", 1)
    with pytest.raises(DatasetError, match="only in train: owl; only in test: none"):
        read(tree)


def test_class_folder_without_images(tree):
    (tree / "train" / "owl").mkdir()
    (tree / "test" / "owl").mkdir()
    write_image(tree / "test" / "owl" / "a.jpg", 1)
    with pytest.raises(DatasetError, match="hold no images") as err:
        read(tree)
    assert "train/owl" in str(err.value) and "test/owl" not in str(err.value)


def test_empty_file_is_named(tree):
    (tree / "test" / "dog" / "img0.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="1 of 15 image files") as err:
        read(tree)
    assert str(tree / "test" / "dog" / "img0.jpg") in str(err.value) and "0 bytes" in str(err.value)


def test_corrupt_files_are_counted_and_first_named(tree):
    (tree / "train" / "cat" / "img1.jpg").write_bytes(b"this is not a jpeg")
    (tree / "train" / "fox" / "img2.jpg").write_bytes(b"\x00\x01\x02")
    with pytest.raises(DatasetError, match="2 of 15 image files are empty or unreadable") as err:
        read(tree)
    assert str(tree / "train" / "cat" / "img1.jpg") in str(err.value)

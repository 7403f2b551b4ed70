"""Batch's optional fields and drop_last (cl/engine/strategy.py, cl/engine/data.py WithExtras, cl/engine/trainer.py): a strategy that
asks gets each sample's index and its un-augmented input (also through the image cache), one that does not gets
neither; `drop_last` keeps only full batches."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cl.engine import cache as image_cache
from cl.engine.data import WithExtras
from cl.engine.stream import Experience, Stream, StreamInfo
from cl.engine.strategy import Strategy
from cl.engine.trainer import Trainer, TrainerConfig
from scenarios.datasets.cifar10 import SmallImageDataset
from scenarios.datasets.imagefolder import ImageFolderDataset
from cl.engine.subset import TargetSubset

pytestmark = pytest.mark.unit


class Flat(nn.Module):
    input_size, in_chans, feature_dim = 8, 3, 3 * 8 * 8

    def forward(self, x):
        return x.flatten(1)


class Recorder(Strategy):
    """Records every batch it is given; trains a linear head."""

    def __init__(self, index=False, raw=False, drop_last=False):
        super().__init__()
        self.needs_index, self.needs_raw_input, self.drop_last = index, raw, drop_last
        self.batches = []

    def setup(self, backbone, info):
        super().setup(backbone, info)
        self.head = nn.Linear(backbone.feature_dim, info.n_classes)

    def train_step(self, batch):
        self.batches.append(batch)
        return nn.functional.cross_entropy(self.head(self.backbone(batch.x)), batch.y)

    def predict(self, x, task_id=None):
        return self.head(self.backbone(x))


def crop_flip_stream(n_per_exp=(10, 7)):
    g = torch.Generator().manual_seed(0)
    n = sum(n_per_exp)
    images = torch.randint(1, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)  # no zeros: padding shows
    targets = np.repeat([0, 1], n_per_exp) * 2 + np.arange(n) % 2
    train = SmallImageDataset(images, targets, ["a", "b", "c", "d"], train=True, augment="crop_flip", pad=4)
    test = train.eval_view()
    exps, start = [], 0
    for i, k in enumerate(n_per_exp):
        idx = np.arange(start, start + k)
        exps.append(Experience(i, TargetSubset(train, idx), TargetSubset(test, idx), [2 * i, 2 * i + 1], "class_il"))
        start += k
    info = StreamInfo("t", "class_il", 4, 2, [0, 1, 2, 3], input_shape=(3, 8, 8),
                      classes_per_experience=[[0, 1], [2, 3]])
    return Stream(exps, info), images


def fit(strategy, stream, **kw):
    strategy.setup(Flat(), stream.info)
    cfg = TrainerConfig(**{"epochs": 2, "batch_size": 4, "progress": False, "device": "cpu", "lr": 0.1, **kw})
    Trainer(cfg).fit(stream, strategy)
    return strategy.batches


def test_nothing_extra_unless_asked():
    stream, _ = crop_flip_stream()
    for b in fit(Recorder(), stream):
        assert b.index is None and b.raw is None


def test_index_and_raw_input_are_the_samples_before_augmentation():
    stream, images = crop_flip_stream()
    batches = fit(Recorder(index=True, raw=True), stream)
    augmented_somewhere = False
    offsets = [0, 10]
    for k, b in enumerate(batches):
        exp = 0 if k < 2 * 3 else 1  # 3 batches per epoch of experience 0 (10 samples), 2 of experience 1 (7)
        pos = b.index + offsets[exp]
        assert b.index.dtype == torch.long
        assert torch.equal(b.raw, images[pos].float() / 255)  # exactly the stored pixels, [0, 1], not resized
        assert torch.equal(b.y, torch.as_tensor(stream[exp].train.targets)[b.index])
        augmented_somewhere |= not torch.equal(b.x, b.raw)
    assert augmented_somewhere  # x is the dataset's augmented item, raw is not


def test_drop_last_keeps_only_full_batches_but_never_an_empty_epoch():
    stream, _ = crop_flip_stream((10, 3))
    sizes = [len(b.y) for b in fit(Recorder(drop_last=True), stream)]
    assert sizes == [4, 4, 4, 4] + [3, 3]  # 10 -> two full batches per epoch; 3 (< one batch) -> kept
    sizes = [len(b.y) for b in fit(Recorder(), stream)]
    assert sizes == [4, 4, 2, 4, 4, 2] + [3, 3]


def test_raw_input_through_the_image_cache_is_the_eval_item(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(tmp_path / "cache"))
    for i in range(3):
        folder = tmp_path / "tree" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    cached = ImageFolderDataset(tmp_path / "tree", image_size=16, train=True)
    image_cache.attach_image_cache([cached], {"image_cache": True})
    ds = WithExtras(cached, index=True, raw=True)
    x, y, extras = ds[1]
    assert isinstance(x, dict) and extras["index"] == 1  # the training item: the cache's device-side crop
    assert torch.equal(extras["raw"], cached.cache.eval_item(1))  # raw: the cache's eval array


def test_an_augmenting_dataset_without_eval_view_is_refused():
    class Augmenting(torch.utils.data.Dataset):
        train, augment = True, "crop_flip"

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return torch.zeros(3, 2, 2, dtype=torch.uint8), 0

    with pytest.raises(ValueError, match="eval_view"):
        WithExtras(Augmenting(), raw=True)
    WithExtras(Augmenting(), index=True)  # the index alone needs no eval view

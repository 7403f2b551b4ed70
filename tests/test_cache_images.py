"""The uint8 image cache (cl/engine/cache.py): the reference's crop and flip draws, the device-side resampling, byte-equal
eval items, and the same accuracy with and without the cache on a tiny ImageFolder stream."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from cl.engine import cache as image_cache
from scenarios.datasets.imagefolder import ImageFolderDataset, pilot_train_transform

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_CACHE_DIR", str(tmp_path / "cache"))


def _reference_params(t: v2.RandomResizedCrop, h: int, w: int) -> dict:
    make = getattr(t, "make_params", None) or t._get_params
    return make([torch.empty(3, h, w, dtype=torch.uint8)])


@pytest.mark.parametrize("h,w", [(300, 400), (400, 300), (40, 500)])  # (40, 500): the centre-crop fallback too
def test_crop_and_flip_draws_are_torchvisions(h, w):
    """Same RNG state -> the same boxes and flips as PILOT's v2 RandomResizedCrop + RandomHorizontalFlip."""
    ref = v2.RandomResizedCrop(224, scale=image_cache.PILOT_SCALE, ratio=image_cache.PILOT_RATIO)
    n = 400
    torch.manual_seed(1)
    mine = []
    for _ in range(n):
        mine.append((*image_cache.random_resized_crop_box(h, w), bool(torch.rand(1) < 0.5)))
    torch.manual_seed(1)
    theirs = []
    for _ in range(n):
        p = _reference_params(ref, h, w)
        theirs.append((p["top"], p["left"], p["height"], p["width"], not bool(torch.rand(1) >= 0.5)))
    assert mine == theirs
    # and the statistics the crops should have: area fraction in [0.05, 1], aspect ratio within [3/4, 4/3]
    boxes = np.array([b[:4] for b in mine], dtype=float)
    area = boxes[:, 2] * boxes[:, 3] / (h * w)
    ratio = boxes[:, 3] / boxes[:, 2]
    assert area.min() >= 0.04 and area.max() <= 1.0
    if h == 300:  # no fallback: the draws follow the reference's distributions
        assert 0.35 < area.mean() < 0.55 and 0.7 < ratio.min() and ratio.max() < 1.4
        assert 0.35 < np.mean([b[4] for b in mine]) < 0.65


def _smooth_image(h, w, seed=0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=g)
    img = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return Image.fromarray((img[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def test_device_crop_matches_pil_resized_crop(tmp_path):
    path = tmp_path / "a.png"
    pil = _smooth_image(300, 400)
    pil.save(path)
    c = image_cache.build_image_cache([str(path)], image_size=64, cache_size=448)
    full = torch.from_numpy(np.array(c.train_array[0]))
    for top, left, h, w, flip in [(0, 0, 300, 400, False), (30, 50, 120, 150, True), (200, 300, 60, 70, False)]:
        ref = v2.functional.resized_crop(pil, top, left, h, w, [64, 64], antialias=True)
        ref = v2.functional.pil_to_tensor(v2.functional.horizontal_flip(ref) if flip else ref).float()
        item = {"image": full[None], "box": torch.tensor([[top / 300, left / 400, (top + h) / 300, (left + w) / 400]]),
                "flip": torch.tensor([flip])}
        out = image_cache.device_augment(item, 64, 3, torch.device("cpu"))[0] * 255
        assert (out - ref).abs().mean() < 1.5, (top, left, h, w)  # grey levels, of 255


def _tree(root, n_classes=4, train=10, test=5):
    from scenarios.datasets.synthetic import make_synthetic

    tr, te = make_synthetic(n_classes=n_classes, image_size=48, train_per_class=train, test_per_class=test)
    for split, ds in (("train", tr), ("test", te)):
        for i in range(len(ds)):
            x, y = ds[i]
            folder = root / split / f"c{y}"
            folder.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray(x.permute(1, 2, 0).numpy()).resize((56, 42), Image.BILINEAR)  # not square
            img.save(folder / f"{i}.png")
    return root


def test_eval_items_are_byte_identical_and_train_items_augment(tmp_path):
    root = _tree(tmp_path / "tree", n_classes=2, train=3, test=2)
    plain = ImageFolderDataset(root / "train", image_size=32, train=True)
    cached = ImageFolderDataset(root / "train", image_size=32, train=True)
    image_cache.attach_image_cache([cached], {"image_cache": True})
    for i in range(len(plain)):
        assert torch.equal(plain.eval_view()[i][0], cached.eval_view()[i][0])
    torch.manual_seed(0)
    x, y = cached[0]
    assert set(x) == {"image", "box", "flip"} and x["image"].shape == (3, 64, 64) and y == 0
    torch.manual_seed(0)
    ref = pilot_train_transform(32)(Image.open(plain.samples[0][0]).convert("RGB"))
    out = image_cache.device_augment({k: v[None] for k, v in x.items()}, 32, 3, torch.device("cpu"))[0] * 255
    assert (out - ref.float()).abs().mean() < 6  # same crop and flip, resampled from the 64 px copy


def test_bad_settings_are_one_line_errors(tmp_path):
    from cl.engine.errors import ConfigError

    with pytest.raises(ConfigError, match="image_cache must be true or false or exact"):
        image_cache.attach_image_cache([], {"image_cache": "yes"})
    with pytest.raises(ConfigError, match="use at least 32"):
        image_cache.build_image_cache([], image_size=32, cache_size=16)


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["finetune", "simplecil"])
def test_same_accuracy_with_and_without_the_cache(tmp_path, compose, run_quiet, strategy):
    root = _tree(tmp_path / "tree")
    results = []
    for on in ("false", "true", "exact"):
        cfg = compose(f"strategy={strategy}", "scenario=imagefolder", "backbone=vit-tiny", f"scenario.root={root}",
                      "scenario.n_classes=4", "scenario.init_cls=2", "scenario.increment=2", "scenario.image_size=32",
                      "trainer.epochs=1", "trainer.batch_size=10", f"++scenario.image_cache={on}")
        cfg["results_root"] = str(tmp_path / f"runs-{on}")  # exact shares false's run id: run it afresh
        path, _ = run_quiet(cfg)
        results.append(json.loads(path.read_text()))
    plain, cached, exact = (r["acc_matrix"] for r in results)
    assert exact == plain  # image_cache=exact (the ImageFolder benchmarks' default) changes nothing but speed
    assert results[2]["run_id"] == results[0]["run_id"]  # and so it keeps the run's directory
    if strategy == "simplecil":  # no augmentation: the eval arrays are the reference's bytes
        assert cached == plain
    else:
        last = [np.mean([a for a in row if a is not None]) for row in (plain[-1], cached[-1])]
        assert abs(last[0] - last[1]) <= 15, (plain, cached)

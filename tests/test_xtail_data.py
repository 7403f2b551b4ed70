"""The X-TAIL readers (scenarios/datasets/xtail_data.py) on tiny fake trees in the CoOp layout: class names and templates as
the reference builds them, few-shot training, union label offsets, the one-line error for a missing dataset, and
the mora_xtail preset end to end on the fake tree with the tiny CLIP."""
import gzip
import json

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.unit


def _jpg(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 10), colour).save(path)


def _coop_json(base, images, split_name, classes, n_train=3, n_test=2):
    split = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(classes):
        for part, n in (("train", n_train), ("test", n_test)):
            for i in range(n):
                rel = f"{cname}/{part}_{i}.jpg"
                _jpg(base / images / rel, (40 * label, 10 * i, 200))
                split[part].append([rel, label, cname])
    (base / split_name).write_text(json.dumps(split))


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_tree(root):
    _coop_json(root / "dtd", "images", "split_zhou_DescribableTextures.json", ["banded", "dotted", "zigzagged"])
    _coop_json(root / "eurosat", "2750", "split_zhou_EuroSAT.json", ["Forest", "River"])
    air = root / "fgvc-aircraft-2013b" / "data"
    air.mkdir(parents=True)
    (air / "variants.txt").write_text("707-320\nA300B4\n")
    for part, n in (("train", 3), ("test", 2)):
        lines = []
        for label, variant in enumerate(["707-320", "A300B4"]):
            for i in range(n):
                image_id = f"{part}{label}{i}"
                _jpg(air / "images" / f"{image_id}.jpg", (0, 90 * label, 30 * i))
                lines.append(f"{image_id} {variant}")
        (air / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", 40), ("t10k", 20)):
        _idx(raw / f"{part}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{part}-labels-idx1-ubyte.gz", np.arange(n) % 10)


DATASETS = "[{source:xtail,name:dtd},{source:xtail,name:eurosat},{source:xtail,name:aircraft},{source:xtail,name:mnist}]"


def _cfg(compose, tmp_path, *extra):
    make_tree(tmp_path / "xtail")
    return compose("scenario=xtail", "backbone=clip-tiny", f"data_root={tmp_path}", "scenario.root=xtail",
                   f"scenario.datasets={DATASETS}", "scenario.shots=2", "scenario.image_size=32", *extra)


def test_readers_build_the_union_with_the_reference_names_and_templates(compose, tmp_path):
    import scenarios
    from cl.models.clip_heads import class_prompts

    stream = scenarios.build(_cfg(compose, tmp_path)["scenario"], tmp_path)
    info = stream.info
    assert info.kind == "union_label" and info.n_classes == 3 + 2 + 2 + 10
    assert info.class_names[:7] == ["banded", "dotted", "zigzagged", "Forest satellite location",
                                    "River satellite location", "707-320", "A300B4"]
    assert info.class_names[7] == 'number: "0 - zero"' and info.class_names[16] == 'number: "9 - nine"'
    prompts = class_prompts(info)
    assert prompts[0] == "banded texture."
    assert prompts[3] == "a centered satellite photo of the Forest satellite location."
    assert prompts[5] == "a photo of a 707-320, a type of aircraft."
    assert prompts[7] == 'a photo of the number: "number: "0 - zero"".'  # the reference's own double wrapping
    assert info.classes_per_experience == [[0, 1, 2], [3, 4], [5, 6], list(range(7, 17))]
    for exp, n_test in zip(stream, (3 * 2, 2 * 2, 2 * 2, 20)):
        train_y, test_y = np.asarray(exp.train.targets), np.asarray(exp.test.targets)
        assert sorted(set(train_y)) == exp.classes and np.all(np.bincount(train_y)[exp.classes] == 2)  # 2 shots
        assert len(test_y) == n_test and set(test_y) <= set(exp.classes)  # the whole test split
        x, y = exp.test[0]
        assert y in exp.classes and x.dtype.is_floating_point is False
    x, _ = stream[0].train[0]
    assert tuple(x.shape) == (3, 32, 32)


def test_missing_dataset_is_one_line_naming_the_tree(compose, tmp_path):
    import scenarios
    from cl.engine.errors import DatasetError

    cfg = _cfg(compose, tmp_path, "scenario.datasets=[{source:xtail,name:food101}]")
    with pytest.raises(DatasetError) as err:
        scenarios.build(cfg["scenario"], tmp_path)
    message = str(err.value)
    assert "\n" not in message and "food-101" in message and "split_zhou_Food101.json" in message
    assert "scenario.root" in message
    with pytest.raises(DatasetError, match="unknown X-TAIL dataset 'food'"):
        scenarios.build(_cfg(compose, tmp_path / "b", "scenario.datasets=[{source:xtail,name:food}]")["scenario"],
                        tmp_path / "b")


@pytest.mark.e2e
def test_mora_xtail_preset_runs_on_a_fake_tree(compose, run_quiet, tmp_path):
    make_tree(tmp_path / "xtail")
    cfg = compose("experiment=mora_xtail", "backbone=clip-tiny", f"data_root={tmp_path}", "scenario.root=xtail",
                  "scenario.datasets=[{source:xtail,name:dtd},{source:xtail,name:eurosat}]", "scenario.shots=2",
                  "scenario.image_size=32", "trainer.epochs=1", "strategy.rank=2", "strategy.topk=2")
    assert cfg["paper"]["last"] == 80.9 and cfg["trainer"]["eval_future"]
    path, lines = run_quiet(cfg)
    result = json.loads(path.read_text())
    assert result["status"] == "finished" and len(result["acc_matrix"]) == 2
    assert any(line.startswith("last: measured") for line in lines)

"""DomainNet in CoSO's layout (InfLoRA split lists + domain folders), read from a tiny tree made here; its
errors list the expected tree; CoSO's presets (ImageNet-R 5/10/20, CIFAR-100, DomainNet) pin the reference's values."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

import scenarios
from cl.app.cli import compose_config
from cl.engine.errors import DatasetError

pytestmark = pytest.mark.unit

CLASSES = ["aircraft_carrier", "bee", "cat", "dog"]  # labels 0..3 of the tiny tree


def make_tree(root, per_split=2):
    """<root>/{clipart,real}/<class>/*.png and two split lists whose paths carry a 'data/DomainNet/' prefix."""
    lists = {"train": {"data": [], "targets": []}, "test": {"data": [], "targets": []}}
    for label, name in enumerate(CLASSES):
        for domain in ("clipart", "real"):
            folder = root / domain / name
            folder.mkdir(parents=True)
            for split in lists:
                for k in range(per_split):
                    file = folder / f"{split}_{k}.png"
                    Image.fromarray(np.full((20, 24, 3), 40 * label + k, dtype=np.uint8)).save(file)
                    lists[split]["data"].append(f"data/DomainNet/{domain}/{name}/{file.name}")
                    lists[split]["targets"].append(label)
    for split, name in (("train", "domainnet_trainb.yaml"), ("test", "domainnet_testb.yaml")):
        (root / name).write_text(yaml.safe_dump(lists[split]))
    return lists


def tiny_cfg(root, *extra):
    cfg = compose_config(["scenario=domainnet", f"scenario.root={root}", "scenario.n_classes=4",
                          "scenario.init_cls=2", "scenario.increment=2", "scenario.image_size=16", *extra])
    return cfg["scenario"]


def test_reads_the_reference_layout_into_class_incremental_tasks(tmp_path):
    make_tree(tmp_path)
    stream = scenarios.build(tiny_cfg(tmp_path))
    assert len(stream) == 2 and [list(e.classes) for e in stream] == [[0, 1], [2, 3]]  # label order
    assert stream.info.class_names == CLASSES and stream.info.n_classes == 4
    x, y = stream[1].test[0]
    assert x.shape == (3, 16, 16) and str(x.dtype) == "torch.uint8" and y in (2, 3)
    assert len(stream[0].train) == 2 * 2 * 2  # 2 classes x 2 domains x 2 images


def test_missing_lists_show_the_expected_tree(tmp_path):
    (tmp_path / "domainnet").mkdir()
    with pytest.raises(DatasetError) as e:
        scenarios.build(tiny_cfg("domainnet"), data_root=tmp_path)
    message = str(e.value)
    assert "domainnet_trainb.yaml" in message and "expected layout" in message
    assert all(f"{d}/<class>/<image>.jpg" in message for d in ("clipart", "infograph", "quickdraw", "sketch"))
    with pytest.raises(DatasetError, match="not found.*set data_root"):
        scenarios.build(tiny_cfg("nowhere"), data_root=tmp_path)


def test_missing_images_and_bad_targets_are_named(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "real" / "dog" / "test_1.png").unlink()
    missing = r"1 of 16 images listed in .*domainnet_testb.yaml are missing, first: .*dog"
    with pytest.raises(DatasetError, match=missing):
        scenarios.build(tiny_cfg(tmp_path))
    with pytest.raises(DatasetError, match=r"targets outside 0..2 .*set scenario.n_classes"):
        scenarios.build(tiny_cfg(tmp_path, "scenario.n_classes=3"))


@pytest.mark.parametrize("preset, tasks, r1, r2, gap, lrs, epochs", [
    ("coso_imagenet-r", (20, 20), 50, 120, 1, (0.0004, 0.0004), 40),
    ("coso_imagenet-r-5", (40, 40), 50, 120, 1, (0.0004, 0.0004), 40),
    ("coso_imagenet-r-20", (10, 10), 50, 120, 1, (0.0004, 0.0004), 40),
    ("coso_cifar100", (10, 10), 15, 100, 1, (0.0003, 0.0005), 20),
    ("coso_domainnet", (69, 69), 70, 160, 20, (0.0001, 0.0005), 5),
])
def test_presets_pin_the_reference_settings(preset, tasks, r1, r2, gap, lrs, epochs):
    cfg = compose_config([f"experiment={preset}"])
    s, st, t = cfg["scenario"], cfg["strategy"], cfg["trainer"]
    assert (s["init_cls"], s["increment"], s["shuffle"]) == (*tasks, False)
    assert (st["proj_rank"], st["sketch_rank"], st["update_gap"], st["lr"], st["fc_lr"]) == (r1, r2, gap, *lrs)
    assert (st["energy_threshold"], st["temperature"], st["head_init"], st["svd"]) == (0.98, 3.0, "default", "exact")
    assert (t["epochs"], t["batch_size"], t["scheduler"]) == (epochs, 128, "constant")
    assert cfg["backbone"]["arch"] == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    if preset == "coso_domainnet":
        assert s["dataset"] == "domainnet" and s["n_classes"] == 345


@pytest.mark.e2e
def test_coso_runs_on_the_tiny_domainnet_tree(tmp_path, compose, run_quiet):
    make_tree(tmp_path / "dn")
    path, _ = run_quiet(compose("strategy=coso", "scenario=domainnet", f"scenario.root={tmp_path / 'dn'}",
                                "scenario.n_classes=4", "scenario.init_cls=2", "scenario.increment=2",
                                "scenario.image_size=32", "backbone=vit-tiny", "debug=fast"))
    result = json.loads(path.read_text())
    assert result["status"] == "finished" and len(result["acc_matrix"]) == 2

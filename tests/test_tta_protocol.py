"""The tta protocol's options (gradual severities, several orders with a reset at each, one random order, mixed
domains, reset at each shift) and the paper presets (compose, missing data lists the expected tree)."""
import pytest
import torch
import torch.nn as nn

from cl.engine.errors import ConfigError
from cl.engine.kind_metrics import tta as metrics_from_history
from scenarios.kinds.tta import build_tta

pytestmark = pytest.mark.unit

SYN = {"dataset": "synthetic-c", "severity": 5, "limit_per_class": 2,
       "synthetic": {"train_per_class": 4, "test_per_class": 4}}


def test_gradual_schedules(tmp_path):
    s = build_tta({**SYN, "corruptions": ["contrast", "fog"], "gradual": True}, tmp_path)
    assert [e.domain for e in s][:10] == [f"contrast_{v}" for v in (1, 2, 3, 4, 5, 4, 3, 2, 1)] + ["fog_1"]
    s = build_tta({**SYN, "corruptions": ["contrast", "fog"], "gradual": "cotta"}, tmp_path)
    assert [e.meta["severity"] for e in s] == [5, 4, 3, 2, 1] + [1, 2, 3, 4, 5, 4, 3, 2, 1]
    with pytest.raises(ConfigError, match="gradual must be"):
        build_tta({**SYN, "gradual": "linear"}, tmp_path)


def test_order_seed_mixed_and_several_orders(tmp_path):
    names = ["gaussian_noise", "impulse_noise", "defocus_blur", "contrast"]
    s = build_tta({**SYN, "corruptions": names, "order_seed": 3}, tmp_path)
    assert sorted(e.meta["corruption"] for e in s) == sorted(names) and [e.meta["corruption"] for e in s] != names
    s = build_tta({**SYN, "corruptions": names, "mixed": True}, tmp_path)
    assert len(s) == 1 and s[0].domain == "mixed" and len(s[0].test) == 4 * 20
    orders = [["contrast", "fog"], ["fog", "contrast"], ["pixelate", "fog"]]
    s = build_tta({**SYN, "orders": orders}, tmp_path)
    assert [e.domain for e in s] == ["contrast_5", "fog_5", "fog_5", "contrast_5", "pixelate_5", "fog_5"]
    assert [e.meta["order"] for e in s] == [0, 0, 1, 1, 2, 2] and s.info.extra["order_starts"] == [0, 2, 4]
    assert torch.equal(s[1].test.tensors[0], s[2].test.tensors[0])  # a recurring domain is the same data
    with pytest.raises(ConfigError, match="exclude each other"):
        build_tta({**SYN, "orders": orders, "order_seed": 1}, tmp_path)


def test_mean_error_per_order():
    from cl.engine.trainer import History

    errs = [10.0, 20.0, 30.0, 50.0]
    h = History(acc_matrix=[[None] * i + [100 - e] for i, e in enumerate(errs)], test_counts=[5] * 4,
                costs=[{"domain": d, "order": o} for d, o in zip(["a_5", "b_5", "b_5", "a_5"], [0, 0, 1, 1])])
    m = metrics_from_history(h)
    assert m["mean_error_per_order"] == pytest.approx([15.0, 40.0]) and m["mean_error"] == pytest.approx(27.5)
    assert m["error_per_domain"] == pytest.approx({"a_5": 30.0, "b_5": 25.0})


def _tent(extra):
    from cl.models.backbones import Backbone
    from cl.engine.stream import Experience, StreamInfo
    from strategies.tent import Tent

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3))
    bb = Backbone(net, name="t", arch="t", feature_dim=3, input_size=8, in_chans=3, normalize="none",
                  weights_id="t", pretrained=True)
    bb.is_classifier = True
    info = StreamInfo(name="t", kind="tta", n_classes=3, n_experiences=3, class_order=[0, 1, 2], extra=extra)
    t = Tent(lr=0.1)
    t.setup(bb, info)
    exps = [Experience(i, None, None, [0, 1, 2], "tta", domain=f"d{i}", meta={"order": int(i >= 2)}) for i in range(3)]
    return t, exps


@pytest.mark.parametrize("extra,resets", [({}, []), ({"reset_each_shift": True}, [1, 2]), ({"order_starts": [0, 2]}, [2])])
def test_reset_at_each_shift_or_order_start(extra, resets):
    t, exps = _tent(extra)
    source = [p.detach().clone() for p in t.backbone.parameters()]
    for e in exps:
        t.begin_experience(e)
        at_source = all(torch.equal(a, b) for a, b in zip(source, t.backbone.parameters()))
        assert at_source == (e.index == 0 or e.index in resets), (e.index, extra)
        t.adapt(torch.rand(8, 3, 8, 8))  # moves the BN affine parameters away from the source
        assert t.adapt_costs()["order"] == e.meta["order"]


PRESETS = {"cotta_cifar10c": ("cifar10-c", "wrn28-10-standard", "CIFAR-10-C/gaussian_noise.npy", 200),
           "cotta_cifar100c": ("cifar100-c", "resnext29-augmix", "CIFAR-100-C/gaussian_noise.npy", 200),
           "cotta_imagenetc": ("imagenet-c", "resnet50-standard", "ImageNet-C/<corruption>/<severity>/<wnid>", 64),
           "tent_cifar10c": ("cifar10-c", "wrn28-10-standard", "CIFAR-10-C/labels.npy", 200),
           "tent_imagenetc": ("imagenet-c", "resnet50-standard", "ImageNet-C/<corruption>", 64),
           "source_cifar10c": ("cifar10-c", "wrn28-10-standard", "CIFAR-10-C/", 200),
           "tent_cifar100c": ("cifar100-c", "resnext29-augmix", "CIFAR-100-C/labels.npy", 200),
           "source_cifar100c": ("cifar100-c", "resnext29-augmix", "CIFAR-100-C/", 200),
           "source_imagenetc": ("imagenet-c", "resnet50-standard", "ImageNet-C/<corruption>", 64),
           "ecotta_cifar10c": ("cifar10-c", "wrn28-10-standard", "CIFAR-10-C/", 64),
           "ecotta_cifar100c": ("cifar100-c", "wrn40-2-augmix", "CIFAR-100-C/", 64)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_compose_and_missing_data_lists_the_tree(compose, tmp_path, name):
    dataset, backbone, tree, batch = PRESETS[name]
    cfg = compose(f"experiment={name}", f"data_root={tmp_path}")
    assert (cfg["scenario"]["dataset"], cfg["backbone"]["name"], cfg["trainer"]["batch_size"]) == (dataset, backbone, batch)
    assert cfg["scenario"]["severity"] == 5 and cfg["scenario"]["reset_each_shift"] is False
    assert isinstance(cfg["paper"]["mean_error"], float) and "not run" in cfg["paper"]["measured"]
    if name == "cotta_imagenetc":  # the reference code's ImageNet settings, CoTTA's ten orders
        s = cfg["strategy"]
        assert (s["optim"], s["restore_prob"], s["ap"], s["loss"], s["nesterov"]) == ("sgd", 0.001, 0.1, "sce", True)
        assert len(cfg["scenario"]["orders"]) == 10 and all(sorted(o) == sorted(cfg["scenario"]["orders"][0])
                                                             for o in cfg["scenario"]["orders"])
    with pytest.raises(ConfigError, match="missing") as err:
        build_tta(cfg["scenario"], tmp_path)
    assert tree in str(err.value)


def test_declared_source_data_is_every_experience_train(tmp_path):
    """scenario.source_data names a registered clean dataset whose TRAIN split EcoTTA/PSMT may use."""
    import numpy as np
    from torch.utils.data import TensorDataset

    from scenarios.datasets.registry import DATASETS, LoadedData

    clean = TensorDataset(torch.zeros(6, 3, 32, 32, dtype=torch.uint8), torch.arange(6) % 2)
    DATASETS["tta-test-clean"] = lambda cfg, root: LoadedData(clean, clean)
    try:
        folder = tmp_path / "CIFAR-10-C"
        folder.mkdir()
        np.lib.format.open_memmap(folder / "fog.npy", mode="w+", dtype=np.uint8, shape=(10000, 32, 32, 3)).flush()
        np.save(folder / "labels.npy", np.zeros(10000, dtype=np.int64))
        cfg = {"dataset": "cifar10-c", "corruptions": ["fog", "fog"], "severity": 1, "n_examples": 4}
        assert len(build_tta(cfg, tmp_path)[0].train) == 0  # none declared
        s = build_tta({**cfg, "source_data": {"dataset": "tta-test-clean"}}, tmp_path)
        assert all(e.train is clean for e in s) and s.info.extra["source_data"] == "tta-test-clean"
    finally:
        DATASETS.pop("tta-test-clean")


@pytest.mark.e2e
def test_ecotta_preset_runs_end_to_end_on_tiny_files(compose, run_quiet, tmp_path):
    """experiment=ecotta_cifar10c through the trainer: released-layout CIFAR-10-C file, declared clean source
    data, the RobustBench WRN-28 (width 1, random init: no checkpoint here), K=5 meta networks, warm-up."""
    import json
    from pathlib import Path

    import numpy as np
    from torch.utils.data import TensorDataset

    from scenarios.datasets.registry import DATASETS, LoadedData

    g = torch.Generator().manual_seed(0)
    clean = TensorDataset(torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(20) % 10)
    DATASETS["tta-test-clean"] = lambda cfg, root: LoadedData(clean, clean)
    try:
        folder = tmp_path / "CIFAR-10-C"
        folder.mkdir()
        np.lib.format.open_memmap(folder / "fog.npy", mode="w+", dtype=np.uint8, shape=(10000, 32, 32, 3))[:20] = 128
        np.save(folder / "labels.npy", np.arange(10000, dtype=np.int64) % 10)
        cfg = compose("experiment=ecotta_cifar10c", f"data_root={tmp_path}", "backbone.widen_factor=1",
                      "backbone.pretrained=false", "scenario.corruptions=[fog]", "scenario.severity=1",
                      "scenario.n_examples=20", "scenario.source_data.dataset=tta-test-clean",
                      "strategy.warmup_epochs=1", "strategy.warmup_batch_size=10", "trainer.batch_size=10")
        path, lines = run_quiet(cfg)
    finally:
        DATASETS.pop("tta-test-clean")
    result = json.loads(Path(path).read_text())
    assert list(result["metrics"]["error_per_domain"]) == ["fog_1"]
    paper = result["paper"]["mean_error"]
    assert any(line.startswith("mean_error: measured") and f"paper {paper:.2f}" in line for line in lines)
    cost = result["costs"]["per_experience"][0]
    assert cost["batches"] == 2 and cost["warmup_s"] > 0 and cost["saved_for_backward_mb"] > 0

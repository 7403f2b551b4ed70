"""The released-file readers of the tta kind, on tiny files the tests write: CIFAR-C .npy severity slicing,
the ImageNet-C folder tree with RobustBench's id list, the RobustBench checkpoint layout, clear errors."""
import numpy as np
import pytest
import torch

from cl.engine.errors import ConfigError

pytestmark = pytest.mark.unit


LABELS = np.random.default_rng(0).integers(0, 10, 10000)  # not periodic: a shifted label slice shows


def _cifar_c(root, corruptions=("gaussian_noise", "contrast")):
    """Released-layout files whose every row is distinct: channel 0/1 hold the row index (r % 251, r // 251),
    channel 2 the pixel position and the corruption, so a permuted, shifted or transposed read fails."""
    folder = root / "CIFAR-10-C"
    folder.mkdir(parents=True)
    r = np.arange(50000)
    pos = (np.arange(32)[:, None] * 32 + np.arange(32)[None, :]) % 200
    for j, c in enumerate(corruptions):
        a = np.empty((50000, 32, 32, 3), dtype=np.uint8)
        a[..., 0] = (r % 251)[:, None, None]
        a[..., 1] = (r // 251)[:, None, None]
        a[..., 2] = (pos + 50 * j)[None]
        np.save(folder / f"{c}.npy", a)
    np.save(folder / "labels.npy", np.tile(LABELS, 5))
    return folder


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """The two 150 MB files are written once for the module."""
    root = tmp_path_factory.mktemp("cifar-c")
    return root, _cifar_c(root)


def _rows(folder, corruption, start, stop):
    """The file's rows start..stop as the reader must return them: uint8 NCHW."""
    return torch.from_numpy(np.array(np.load(folder / f"{corruption}.npy", mmap_mode="r")[start:stop])).permute(0, 3, 1, 2)


def _row_index(x):
    return x[:, 0, 0, 0].long() + 251 * x[:, 1, 0, 0].long()


def test_cifar_c_severity_slicing_and_labels(cifar_root):
    from scenarios.datasets.cifar_c import load_cifar_c

    tmp_path, folder = cifar_root
    x, y = load_cifar_c("cifar10-c", tmp_path, "contrast", 5)  # severity 5: rows 40000..50000, all of them
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, _rows(folder, "contrast", 40000, 50000))
    assert torch.equal(_row_index(x), torch.arange(40000, 50000))
    assert torch.equal(y, torch.from_numpy(LABELS))  # labels[:10000], row i with label i
    x, y = load_cifar_c("cifar10-c", tmp_path, "gaussian_noise", 3, n_examples=100)  # the first n, in file order
    assert torch.equal(x, _rows(folder, "gaussian_noise", 20000, 20100))
    assert torch.equal(y, torch.from_numpy(LABELS[:100]))


def test_cifar_c_stream_and_missing_file_lists_tree(cifar_root):
    from scenarios.kinds.tta import build_tta

    tmp_path, folder = cifar_root
    s = build_tta({"dataset": "cifar10-c", "corruptions": ["gaussian_noise", "contrast"], "severity": 5,
                   "n_examples": 50}, tmp_path)
    assert [e.domain for e in s] == ["gaussian_noise_5", "contrast_5"] and s.info.extra["corruption_source"] == "released"
    for e, c in zip(s, ("gaussian_noise", "contrast")):
        x, y = e.test.tensors
        assert torch.equal(x, _rows(folder, c, 40000, 40050))
        assert torch.equal(y, torch.from_numpy(LABELS[_row_index(x).numpy() - 40000]))  # each image keeps its label
    with pytest.raises(ConfigError, match="CIFAR-10-C/shot_noise.npy"):
        build_tta({"dataset": "cifar10-c", "corruptions": ["shot_noise"]}, tmp_path)


def test_imagenet_c_tree_uses_robustbench_ids(tmp_path):
    from PIL import Image

    from scenarios.datasets.imagenet_c import ImageNetC, robustbench_ids

    ids = robustbench_ids()
    assert len(ids) == 5000 and len(set(ids)) == 5000
    folder = tmp_path / "ImageNet-C" / "fog" / "5"
    for entry in ids[:3]:
        (folder / entry).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (224, 224), (10, 20, 30)).save(folder / entry)
    (folder / "n00000000").mkdir()  # an extra class folder shifts nothing before it
    ds = ImageNetC(tmp_path, "fog", 5, n_examples=3)
    wnids = sorted(p.name for p in folder.iterdir())
    assert [int(t) for t in ds.targets] == [wnids.index(e.split("/")[0]) for e in ids[:3]]
    x, _ = ds[0]
    assert x.shape == (3, 224, 224) and x.dtype == torch.uint8
    with pytest.raises(ConfigError, match="missing"):
        ImageNetC(tmp_path, "fog", 5, n_examples=10)
    with pytest.raises(ConfigError, match=r"ImageNet-C/<corruption>/<severity>/<wnid>"):
        ImageNetC(tmp_path, "snow", 5)


def test_robustbench_checkpoint_layout(tmp_path):
    from cl.models.backbones_robustbench import robustbench_state_dict

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    folder = tmp_path / "cifar10" / "corruptions"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, folder / "Standard.pt")
    state = robustbench_state_dict(tmp_path, "cifar10-c", "Standard")
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fresh.load_state_dict(state)
    assert torch.equal(fresh[0].weight, net[0].weight)
    with pytest.raises(ConfigError, match="cifar100/corruptions/Hendrycks2020AugMix_ResNeXt.pt"):
        robustbench_state_dict(tmp_path, "cifar100-c", "Hendrycks2020AugMix_ResNeXt")


def test_generated_option_is_labelled(tmp_path):
    pytest.importorskip("imagecorruptions", reason="the optional extra `tta` is not installed: pip install -e .[tta]")
    from scenarios.kinds.tta import build_tta

    s = build_tta({"dataset": "generated", "clean": {"dataset": "synthetic", "image_size": 32, "test_per_class": 2},
                   "corruptions": ["gaussian_noise"], "severity": 3}, tmp_path)
    assert s.info.extra["corruption_source"] == "generated:imagecorruptions"
    x = s[0].test.tensors[0]
    assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)


def test_unknown_corruption_is_a_config_error(tmp_path):
    from scenarios.kinds.tta import build_tta

    with pytest.raises(ConfigError, match="scenario.corruptions"):
        build_tta({"dataset": "synthetic-c", "corruptions": ["gausian_noise"]}, tmp_path)

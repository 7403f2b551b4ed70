"""open_clip backbone source: tiny random CLIP builds offline; weights files are checked with one-line errors."""
import pytest
import torch
from omegaconf import OmegaConf

from cl.models.backbones import build
from cl.engine.errors import BackboneError

pytestmark = pytest.mark.unit


def _cfg(name):
    return OmegaConf.to_container(OmegaConf.load(f"configs/backbone/{name}.yaml"))


@pytest.fixture(scope="module")
def tiny():
    return build(_cfg("clip-tiny"))


def test_tiny_clip_image_and_text_towers(tiny):
    feats = tiny(torch.rand(3, 3, 32, 32))
    text = tiny.encode_text(["a photo of a cat", "a photo of a dog"])
    assert feats.shape == (3, tiny.feature_dim) and text.shape == (2, tiny.feature_dim)
    assert float(tiny.logit_scale) > 1.0 and tiny.weights_id == "random-init"


def test_weights_file_roundtrip_and_mismatch(tiny, tmp_path):
    path = tmp_path / "clip.pt"
    torch.save(tiny.clip.state_dict(), path)
    again = build({**_cfg("clip-tiny"), "weights": str(path)})
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(again(x), tiny(x)) and again.weights_id.startswith("file:clip.pt")
    torch.save({"visual.proj": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(BackboneError, match="does not match"):
        build({**_cfg("clip-tiny"), "weights": str(tmp_path / "bad.pt")})
    with pytest.raises(BackboneError, match="does not exist"):
        build({**_cfg("clip-tiny"), "weights": str(tmp_path / "none.pt")})


def test_real_preset_without_local_weights_names_the_fix(tmp_path):
    with pytest.raises(BackboneError, match="nothing is downloaded"):
        build({**_cfg("clip-vit-b16"), "cache_dir": str(tmp_path)})

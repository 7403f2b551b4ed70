import pytest
import torch

from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.errors import BackboneError, ConfigError

pytestmark = pytest.mark.unit


def backbone_cfg(name: str) -> dict:
    return compose_config([f"backbone={name}"])["backbone"]


@pytest.mark.parametrize("name", ["vit-tiny", "resnet-tiny"])
def test_tiny_backbones_are_test_sized_and_random(name):
    bb = backbones.build(backbone_cfg(name))
    n_params = sum(p.numel() for p in bb.parameters())
    assert n_params < 2_000_000
    assert bb.input_size == 32 and not bb.pretrained
    assert bb.weights_id.startswith("random-init")
    out = bb(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, bb.feature_dim)


def test_vit_tiny_matches_the_contract():
    bb = backbones.build(backbone_cfg("vit-tiny"))
    assert type(bb.model).__name__ == "VisionTransformer"  # the same timm code path as ViT-B/16
    assert len(bb.model.blocks) <= 4 and bb.feature_dim <= 192


def test_weights_file_round_trip_records_hash(tmp_path):
    cfg = backbone_cfg("vit-tiny")
    src = backbones.build(cfg)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {**src.model.state_dict(), "head.weight": torch.zeros(5, 128)}}, path)
    loaded = backbones.build({**cfg, "weights": str(path)})
    assert loaded.pretrained and loaded.weights_id.startswith("file:w.pth:sha256:")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(src(x), loaded(x))


def test_mismatched_weights_file_names_the_fix(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(backbones.build(backbone_cfg("resnet-tiny")).model.state_dict(), path)
    with pytest.raises(BackboneError, match="does not match architecture"):
        backbones.build({**backbone_cfg("vit-tiny"), "weights": str(path)})


def test_missing_weights_file(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        backbones.build({**backbone_cfg("vit-tiny"), "weights": str(tmp_path / "nope.pth")})


def test_pretrained_without_cache_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = {**backbone_cfg("vit-tiny"), "pretrained": True, "arch": "vit_tiny_patch16_224.augreg_in21k_ft_in1k"}
    with pytest.raises(BackboneError, match="not in the local cache"):
        backbones.build(cfg)


def test_unknown_arch_and_normalisation():
    with pytest.raises(ConfigError, match="timm has no architecture"):
        backbones.build({**backbone_cfg("vit-tiny"), "arch": "vit_nonexistent_42"})
    with pytest.raises(ConfigError, match="normalize"):
        backbones.build({**backbone_cfg("vit-tiny"), "normalize": "zscore"})


def test_normalisation_is_applied_inside_the_backbone():
    cfg = backbone_cfg("resnet-tiny")
    torch.manual_seed(0)
    plain = backbones.build(cfg)
    norm = backbones.build({**cfg, "normalize": "imagenet"})
    norm.model.load_state_dict(plain.model.state_dict())
    plain.eval(), norm.eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(norm(x), plain((x - mean) / std), atol=1e-5)


def test_pretrained_weights_come_from_the_local_hf_cache(tmp_path, monkeypatch):
    """timm's own loader reads the cached file; the id records the hub tag and the file's hash."""
    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    arch = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    cfg = {**backbone_cfg("vit-tiny"), "pretrained": True, "arch": arch}
    source = backbones.build({**cfg, "pretrained": False})
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = backbones.build(cfg)
    assert loaded.pretrained and loaded.weights_id.startswith("timm:timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k:sha256:")
    x = torch.rand(2, 3, 32, 32)
    source.eval(), loaded.eval()
    assert torch.allclose(source(x), loaded(x))

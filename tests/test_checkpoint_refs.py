"""Checkpoints keep what the strategy changed and reference the frozen weights (cl/engine/frozen_refs.py); the weights
file's digest is cached by path, size and mtime (cl/backbones.file_digest)."""
import os
import time

import pytest
import torch
from torch import nn

from cl.models.backbones import file_digest
from cl.engine.errors import BackboneError
from cl.engine.frozen_refs import FrozenReference

pytestmark = pytest.mark.unit


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.register_buffer("ema", torch.zeros(3))


def test_untouched_tensors_are_referenced_and_restored_bit_exactly():
    m = Tiny()
    ref = FrozenReference(m, "file:w:sha256:abc")
    with torch.no_grad():
        m.head.weight.add_(1.0)
        m.ema.data.add_(0.5)  # in place through .data: no version bump, still detected by content
    kept, refs = ref.split(m.state_dict())
    assert set(kept) == {"head.weight", "ema"} and set(refs["tensors"]) == {"backbone.weight", "backbone.bias",
                                                                            "head.bias"}
    fresh = Tiny()  # rebuilt from the same weights and seed
    restored = FrozenReference(fresh, "file:w:sha256:abc").restore(kept, refs)
    fresh.load_state_dict(restored)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_other_weights_or_a_changed_tensor_are_refused():
    m = Tiny()
    kept, refs = FrozenReference(m, "w1").split(m.state_dict())
    with pytest.raises(BackboneError, match="made with backbone weights w1"):
        FrozenReference(Tiny(), "w2").restore(kept, refs)
    other = Tiny()
    with torch.no_grad():
        other.backbone.weight.mul_(2)
    with pytest.raises(BackboneError, match="'backbone.weight'"):
        FrozenReference(other, "w1").restore(kept, refs)


@pytest.mark.e2e
def test_a_simplecil_checkpoint_holds_no_backbone_tensors(compose, run_quiet):
    cfg = compose("strategy=simplecil", "scenario=synthetic", "debug=fast")
    path, _ = run_quiet(cfg)
    ckpts = sorted((path.parent / "checkpoints").glob("exp_*.pt"))
    state = torch.load(ckpts[-1], weights_only=True)
    refs = state["frozen"]["tensors"]
    assert any(k.startswith("backbone.") for k in refs)
    assert not any(k.startswith("backbone.") for k in state["strategy"])  # prototypes etc. only
    # and the same command reloads it: the referenced tensors are rebuilt and verified
    again, lines = run_quiet(cfg)
    assert again == path and any("already finished" in line for line in lines)


def test_weights_digest_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    first = file_digest(f)
    assert (tmp_path / "cache" / "file_digests.json").is_file()
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert file_digest(f) == first and str(f) not in map(str, opened)  # from the cache: the file is not read
    monkeypatch.undo()
    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    time.sleep(0.01)
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**6))
    assert file_digest(f) != first

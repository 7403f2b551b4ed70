import pytest
import torch

from scenarios.synthetic_text import make_texts
from strategies.slm import TaskKeys

N_TASKS = 3


@pytest.fixture(scope="module")
def encoded():
    from cl.backbones_hf import HFTextEncoder

    enc = HFTextEncoder("bundled-minilm", max_length=32).eval()
    out = {}
    with torch.no_grad():
        for t in range(N_TASKS):
            out[t] = (enc(make_texts(t, 8, seed=0)[0]), enc(make_texts(t, 8, seed=1)[0]))
    return out


def test_retrieval_picks_each_tasks_slots_on_held_out_text(encoded):
    torch.manual_seed(0)
    keys = TaskKeys(encoded[0][0].shape[1], N_TASKS, slots_per_task=4, groups=6, top_k=4)
    for t in range(N_TASKS):
        keys.train_task(encoded[t][0], t, epochs=10, lr=1e-2)  # 16 texts, not a full task: more steps
    for t in range(N_TASKS):
        idx, w = keys.retrieve(encoded[t][1], N_TASKS)
        assert set(idx.tolist()) == set(range(t * 4, t * 4 + 4))
        assert torch.isclose(w.sum(), torch.tensor(1.0))
        idx_s, _ = keys.retrieve(encoded[t][1], N_TASKS, per_sample=True)
        assert ((idx_s // 4) == t).float().mean() > 0.9


def test_hf_backbone_missing_path_is_one_line_error(tmp_path):
    from cl.backbones_hf import resolve_path
    from cl.errors import BackboneError

    with pytest.raises(BackboneError, match="config.json"):
        resolve_path(str(tmp_path / "nope"))


def test_hf_source_builds_bundled_minilm_backbone():
    from cl.backbones import build

    bb = build({"source": "hf", "name": "minilm", "path": "bundled-minilm", "max_length": 16})
    assert bb.feature_dim == 384
    with torch.no_grad():
        assert bb(["a football match", "a tasty pizza"]).shape == (2, 384)

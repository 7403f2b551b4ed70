"""SLM (issue 7): DTKR retrieval on held-out text, JARe's merge and its freezing of other tasks, end to end vs finetune."""
import pytest
import torch
from torch import nn

from scenarios.datasets.synthetic_text import make_texts
from strategies.slm import JAReLinear, TaskKeys

pytestmark = pytest.mark.unit

N_TASKS = 3


@pytest.fixture(scope="module")
def encoder():
    from cl.models.backbones_hf import HFTextEncoder

    return HFTextEncoder("bundled-minilm", max_length=32).eval()


@pytest.fixture(scope="module")
def encoded(encoder):
    with torch.no_grad():
        return {t: (encoder(make_texts(t, 16, seed=0)[0]), encoder(make_texts(t, 16, seed=1)[0])) for t in range(N_TASKS)}


@pytest.mark.e2e
def test_retrieval_picks_each_tasks_slots_on_held_out_text(encoded):
    """Keys trained with the strategy's defaults (3 epochs, lr 1e-3, bs 4, dropout 0.25, >= 100 steps) on 32 texts
    per task; held-out texts of each task retrieve exactly that task's 4 slots, per batch and per sample."""
    torch.manual_seed(0)
    keys = TaskKeys(encoded[0][0].shape[1], N_TASKS, slots_per_task=4, groups=6, top_k=4)
    before = keys.keys.detach().clone()
    for t in range(N_TASKS):
        losses = keys.train_task(encoded[t][0], t, min_steps=100)
        assert losses[-1] < losses[0]
        if t == 0:  # only task 0's slots moved
            assert torch.equal(keys.keys[:, 4:], before[:, 4:]) and not torch.equal(keys.keys[:, :4], before[:, :4])
    for t in range(N_TASKS):
        idx, w = keys.retrieve(encoded[t][1], N_TASKS)
        assert set(idx.tolist()) == set(range(t * 4, t * 4 + 4))
        assert torch.isclose(w.sum(), torch.tensor(1.0))
        idx_s, w_s = keys.retrieve(encoded[t][1], N_TASKS, per_sample=True)
        assert idx_s.shape == (32, 4) and torch.allclose(w_s.sum(1), torch.ones(32))
        assert ((idx_s // 4) == t).float().mean() > 0.9
    idx, _ = keys.retrieve(encoded[2][1], 1)  # only task 0 seen: nothing else can be retrieved
    assert set(idx.tolist()) == {0, 1, 2, 3}


def test_jare_merge_is_the_weighted_sum_of_low_rank_increments():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = JAReLinear(base, pool=5, rank=3)
    h = torch.randn(2, 4, 8)
    assert torch.equal(layer(h), base(h))  # no route: the frozen layer
    layer.route = (torch.tensor([1, 3]), torch.tensor([0.7, 0.3]))
    assert torch.equal(layer(h), base(h))  # A starts at zero: the increments start at zero
    with torch.no_grad():
        layer.A.normal_()
    dW = 0.7 * layer.A[1].T @ layer.B[1] + 0.3 * layer.A[3].T @ layer.B[3]  # [out, in]
    expect = nn.functional.linear(h, base.weight + dW, base.bias)  # the reference: F.linear(h, W + dW, b)
    assert torch.allclose(layer(h), expect, atol=1e-5)
    # per sample: sample 0 uses the same route, sample 1 another; equal to per-batch merges sample by sample
    layer.route = (torch.tensor([[1, 3], [0, 2]]), torch.tensor([[0.7, 0.3], [0.5, 0.5]]))
    out = layer(h)
    assert torch.allclose(out[0], expect[0], atol=1e-5)
    layer.route = (torch.tensor([0, 2]), torch.tensor([0.5, 0.5]))
    assert torch.allclose(out[1], layer(h)[1], atol=1e-5)


def test_training_a_task_moves_only_its_slots_and_head_rows():
    from cl.models.backbones import build
    from cl.engine.stream import Experience, StreamInfo
    from cl.engine.strategy import Batch
    from scenarios.kinds.text import TextDataset
    from strategies.slm import SLM

    torch.manual_seed(0)
    bb = build({"source": "hf", "name": "minilm", "path": "bundled-minilm", "max_length": 16})
    info = StreamInfo("t", "text", 4, 2, [0, 1, 2, 3], classes_per_experience=[[0, 1], [2, 3]], input_shape=())
    slm = SLM(key_min_steps=5)
    slm.setup(bb, info)
    assert len(slm.jare) == 6 and slm.pool == 8  # MiniLM-L6: one attention-output projection per layer
    texts, labels = make_texts(1, 4, seed=0)
    exp = Experience(1, TextDataset(texts, [2 + y for y in labels]), TextDataset(texts, labels), [2, 3], "text", 1)
    slm.observe_classes(Experience(0, exp.train, exp.test, [0, 1], "text"))
    slm.observe_classes(exp)
    params = slm.begin_experience(exp)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    loss = slm.train_step(Batch(texts, torch.tensor([2 + y for y in labels])))
    loss.backward()
    opt.step()
    slm.after_optimizer_step()
    for p, p0 in zip(params[:-2], before[:-2]):  # A, B of every layer: task 1 is slots 4..7
        assert torch.equal(p[:4], p0[:4]) and not torch.equal(p[4:], p0[4:])
    w, w0 = params[-2], before[-2]
    assert torch.equal(w[:2], w0[:2]) and not torch.equal(w[2:], w0[2:])
    assert slm.trained_param_count() == 4 * sum(l.A[0].numel() + l.B[0].numel() for l in slm.jare) + 2 * 385
    logits = slm.predict(texts)
    assert logits.shape == (8, 4)


@pytest.mark.e2e
def test_slm_beats_finetune_on_synthetic_text(compose, run_quiet):
    """The issue's done-when: scenario=synthetic-text debug=fast with the bundled MiniLM, same overrides."""
    import json

    last = {}
    for strategy in ("slm", "finetune"):
        path, _ = run_quiet(compose("scenario=synthetic-text", "debug=fast", f"strategy={strategy}"))
        result = json.loads(path.read_text())
        assert result["status"] == "finished"
        last[strategy] = result["metrics"]["last_acc"]
    assert last["slm"] > last["finetune"], last


def test_hf_backbone_missing_path_is_one_line_error(tmp_path):
    from cl.models.backbones_hf import resolve_path
    from cl.engine.errors import BackboneError

    with pytest.raises(BackboneError, match="config.json"):
        resolve_path(str(tmp_path / "nope"))


def test_hf_source_builds_bundled_minilm_backbone():
    from cl.models.backbones import build

    bb = build({"source": "hf", "name": "minilm", "path": "bundled-minilm", "max_length": 16})
    assert bb.feature_dim == 384
    with torch.no_grad():
        assert bb(["a football match", "a tasty pizza"]).shape == (2, 384)


def test_slm_rejects_bad_config():
    from cl.engine.errors import ConfigError
    from strategies.slm import SLM

    with pytest.raises(ConfigError, match="sample or batch"):
        SLM(retrieval="task")


@pytest.mark.slow
def test_joint_runs_on_synthetic_text(compose, run_quiet):
    import json

    path, _ = run_quiet(compose("scenario=synthetic-text", "debug=fast", "strategy=joint"))
    assert json.loads(path.read_text())["status"] == "finished"

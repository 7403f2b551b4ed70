"""MoRA on the `text` kind (strategies/mora.py + strategies/mora_text.py): the experts sit on the language model's
q/k/v/out and FFN in/out Linears, old tasks' experts stay frozen bit for bit, and the bare command runs and beats
chance. (mora vs finetune on synthetic-text is measured in docs/clip_and_mora.md, not asserted.)"""
import json

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.unit


def _texts(n, seed):
    from scenarios.datasets.synthetic_text import make_texts

    return make_texts(1, n, seed=seed)


def _setup(**kw):
    from cl.models.backbones import build
    from cl.engine.stream import StreamInfo
    from strategies.mora import MoRA

    torch.manual_seed(0)
    bb = build({"source": "hf", "name": "minilm", "path": "bundled-minilm", "max_length": 16})
    info = StreamInfo("t", "text", 4, 2, [0, 1, 2, 3], classes_per_experience=[[0, 1], [2, 3]], input_shape=())
    mora = MoRA(**kw)
    mora.setup(bb, info)
    return bb, info, mora


def _train(mora, index, classes, texts, labels):
    from cl.engine.stream import Experience
    from cl.engine.strategy import Batch
    from scenarios.kinds.text import TextDataset

    y = [classes[v] for v in labels]
    exp = Experience(index, TextDataset(texts, y), TextDataset(texts, y), classes, "text", index)
    mora.observe_classes(exp)
    params = mora.begin_experience(exp)
    opt = torch.optim.AdamW(params, lr=1e-2)
    mora.train()
    loss = mora.train_step(Batch(texts, torch.tensor(y)))
    opt.zero_grad()
    loss.backward()
    opt.step()
    mora.eval()
    return params


@pytest.mark.e2e
def test_experts_wrap_the_language_models_linears_and_old_ones_stay_frozen():
    from strategies.mora import RankOneExperts

    bb, info, mora = _setup(rank=2, topk=2)
    names = {n for n, m in bb.named_modules() if isinstance(m, RankOneExperts)}
    assert len(mora.experts) == len(names) == 6 * 6  # MiniLM-L6: 6 layers x (q k v o ffn_in ffn_out)
    suffixes = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "intermediate.dense", "output.dense")
    for s in suffixes:  # every target of every layer, nothing else (the pooler is not a target)
        assert sum(n.endswith(s) and not (s == "output.dense" and "attention" in n) for n in names) == 6, s
    assert not any("pooler" in n for n in names)
    assert all(not p.requires_grad or n.endswith((".A", ".B")) for n, p in bb.named_parameters())
    frozen = {n: p.detach().clone() for n, p in bb.named_parameters() if ".base." in n}

    texts, labels = _texts(4, 0)
    _train(mora, 0, [0, 1], texts, labels)
    first = [(layer.A.detach().clone(), layer.B.detach().clone()) for layer in mora.experts]
    assert all(B.abs().sum() > 0 for _, B in first)  # task 0 trained its experts
    params = _train(mora, 1, [2, 3], *_texts(4, 1))
    expert_params = {id(p) for layer in mora.experts for p in (layer.A, layer.B)}
    assert {id(p) for p in params} == expert_params | {id(mora.head.weight), id(mora.head.bias)}
    for layer, (A1, B1) in zip(mora.experts, first):
        assert layer.n_experts == 4 and not layer.old_A.requires_grad and not layer.old_B.requires_grad
        assert torch.equal(layer.old_A, A1) and torch.equal(layer.old_B, B1)  # frozen: bit for bit
        assert layer.B.abs().sum() > 0  # task 1's experts trained
    for n, p in bb.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # the language model's own weights never move

    # the experts are live in the forward pass (B != 0 changes the features), and a resumed run rebuilds them
    logits = mora.predict(texts)
    assert logits.shape == (8, 4)
    _, _, fresh = _setup(rank=2, topk=2)
    assert not torch.allclose(fresh.backbone(texts), bb(texts), atol=1e-4)
    fresh.load_state_dict(mora.state_dict())
    fresh.eval()
    assert torch.allclose(fresh.predict(texts), logits, atol=1e-5)


def test_unknown_text_targets_are_one_clear_error():
    from cl.engine.errors import ConfigError
    from strategies.mora_text import add_text_experts

    with pytest.raises(ConfigError, match="match no Linear of the text backbone"):
        add_text_experts(nn.Sequential(nn.Linear(2, 2)), ["q"], lambda lin: lin)


@pytest.mark.e2e
def test_mora_runs_on_synthetic_text_and_beats_chance(compose, run_quiet):
    """The bare command `strategy=mora scenario=synthetic-text debug=fast` (3 tasks x 2 classes: chance 16.7)."""
    path, _ = run_quiet(compose("strategy=mora", "scenario=synthetic-text", "debug=fast"))
    result = json.loads(path.read_text())
    assert result["status"] == "finished"
    assert result["metrics"]["last_acc"] > 25, result["metrics"]

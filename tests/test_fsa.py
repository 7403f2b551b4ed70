"""FSA: the incremental LDA head equals the batch LDA, FiLM placement and what trains in session 1, and end to end
against finetune."""
import json

import pytest
import torch

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.strategy import Batch
from strategies.fsa import lda_head, reference_film_bns

pytestmark = pytest.mark.unit


def build(*overrides, scenario="synthetic"):
    cfg = compose_config(["strategy=fsa", f"scenario={scenario}", "debug=fast", "trainer.progress=false",
                          "trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    return cfg, stream, strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info)


def batch_lda(feats, labels, n_classes, shrinkage):
    """The reference's compute_lda_head on every feature at once: torch.cov + shrinkage * I, class means,
    Cholesky solve; here via a plain linear solve."""
    sigma = torch.cov(feats.T, correction=1) + shrinkage * torch.eye(feats.shape[1], dtype=feats.dtype)
    w = torch.zeros(n_classes, feats.shape[1], dtype=feats.dtype)
    b = torch.zeros(n_classes, dtype=feats.dtype)
    for c in labels.unique():
        mu = feats[labels == c].mean(0)
        coeff = torch.linalg.solve(sigma, mu)
        w[c], b[c] = coeff, coeff @ mu
    return w, b


def test_incremental_lda_equals_the_batch_lda_after_every_session():
    _, _, fsa = build()
    gen = torch.Generator().manual_seed(0)
    d, n_classes = fsa.backbone.feature_dim, fsa.info.n_classes
    sessions = [(60, [0, 1, 2, 3]), (10, [4, 5]), (10, [6, 7]), (10, [8, 9])]  # (samples per class, classes)
    seen_f, seen_y = [], []
    for per_class, classes in sessions:
        y = torch.tensor(classes).repeat_interleave(per_class)
        f = 3.0 * torch.randn(len(y), d, generator=gen, dtype=torch.float64) + y[:, None].double() * 0.5 + 4.0
        fsa.accumulate(f, y)
        fsa.refit()
        seen_f.append(f)
        seen_y.append(y)
        w, b = batch_lda(torch.cat(seen_f), torch.cat(seen_y), n_classes, shrinkage=1.0)
        assert torch.allclose(fsa.lda_weight, w, rtol=0, atol=1e-8)
        assert torch.allclose(fsa.lda_bias, b, rtol=0, atol=1e-8)
    assert fsa.lda_weight.dtype == torch.float64
    # the logits are x^T Sigma^-1 mu_c - mu_c^T Sigma^-1 mu_c / 2
    x = torch.cat(seen_f)[:5]
    fsa.seen_mask[:] = True
    expected = x @ w.T - 0.5 * b
    assert torch.allclose(x @ fsa.lda_weight.T - 0.5 * fsa.lda_bias, expected, atol=1e-8)


def test_lda_of_a_single_sample_uses_the_uncorrected_covariance():
    f = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    w, b = lda_head(f.clone(), torch.tensor([1.0], dtype=torch.float64), f.T @ f, shrinkage=1.0)
    assert torch.allclose(w[0], f[0]) and torch.allclose(b[0], f[0] @ f[0])  # Sigma = 0 + I


def test_efficientnet_film_sits_after_the_stem_depthwise_and_head_batchnorms():
    bb = backbones.build({**compose_config(["backbone=efficientnet-b0"])["backbone"], "pretrained": False,
                          "input_size": 64})
    bns = reference_film_bns(bb.model)
    assert bns[0] is bb.model.bn1 and bns[-1] is bb.model.bn2
    assert len(bns) == 2 + 16  # stem, one per MBConv block (16 in B0), head
    stream = scenarios.build(compose_config(["scenario=synthetic"])["scenario"])
    x = torch.rand(2, 3, 64, 64)
    bb.eval()
    before = bb(x)
    fsa = strategies.build({"name": "fsa", "adapt": "film"}, bb, stream.info)
    assert len(fsa.films) == 18
    assert torch.equal(fsa.backbone(x), before)  # FiLM starts as the identity
    fsa.observe_classes(stream[0])
    groups = fsa.begin_experience(stream[0])
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for f in fsa.films for p in f.parameters()} | {id(p) for p in fsa.head.parameters()}
    fsa.train()
    assert not fsa.backbone.training and fsa.drop.training  # BN statistics stay frozen in FiLM mode
    stats = bb.model.bn1.running_mean.clone()
    fsa.train_step(Batch(x, torch.tensor(stream[0].classes)))
    assert torch.equal(bb.model.bn1.running_mean, stats)


def test_film_on_a_vit_modulates_every_layernorm_and_full_trains_the_body():
    _, stream, fsa = build("strategy.adapt=film")
    assert len(fsa.films) == 4  # one BlockFiLM (norm1 + norm2) per block of vit-tiny
    fsa.observe_classes(stream[0])
    n = sum(p.numel() for g in fsa.begin_experience(stream[0]) for p in g["params"])
    assert n == 4 * 2 * 2 * 128 + 128 * 10 + 10
    _, stream, fsa = build("strategy.adapt=full")
    fsa.observe_classes(stream[0])
    n = sum(p.numel() for g in fsa.begin_experience(stream[0]) for p in g["params"])
    assert n == fsa.backbone_params() + 128 * 10 + 10
    fsa.observe_classes(stream[1])
    assert fsa.begin_experience(stream[1]) == []  # frozen after the first session


@pytest.fixture(scope="module")
def fsa_vs_finetune(tmp_path_factory):
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.getbasetemp() / "ptm2-shared-runs"  # finetune's run is shared with test_sema.py
    out = {}
    for strategy in ("fsa", "finetune"):
        cfg = compose_config([f"strategy={strategy}", "scenario=synthetic", "backbone=vit-tiny", "debug=fast",
                              f"results_root={root}", "trainer.progress=false", "trainer.device=cpu"])
        out[strategy] = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
    return out


@pytest.mark.e2e
def test_fsa_beats_finetune_end_to_end(fsa_vs_finetune):
    fsa, ft = fsa_vs_finetune["fsa"]["metrics"], fsa_vs_finetune["finetune"]["metrics"]
    assert fsa["last_acc"] > ft["last_acc"] + 20


@pytest.mark.e2e
def test_fsa_costs_count_the_first_session_body_and_the_stored_statistics(fsa_vs_finetune):
    costs = fsa_vs_finetune["fsa"]["costs"]["per_experience"]
    body = fsa_vs_finetune["fsa"]["backbone_info"]["params"]
    assert costs[0]["trainable_params"] == body + 128 * 10 + 10
    assert all(c["trainable_params"] == 0 for c in costs[1:])
    stats = 10 * 128 + 10 + 128 * 128 + 10 * 128 + 10  # class sums, counts, scatter, LDA weight and bias
    assert costs[-1]["added_params"] == 128 * 10 + 10 + stats

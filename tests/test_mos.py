"""MOS mechanisms: warm start, the adapter pull (clean and reference), self-refined retrieval, classifier
alignment, and end to end against finetune."""
import json

import pytest
import torch

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.unit


def build_mos(*overrides):
    cfg = compose_config(["strategy=mos", "scenario=synthetic", "debug=fast", "trainer.progress=false",
                          "trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    mos = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    return cfg, stream, mos


def flat(adapters):
    return torch.cat([p.detach().flatten() for p in adapters.parameters()])


def test_adapter_is_warm_started_from_the_previous_one():
    cfg, stream, mos = build_mos("trainer.limit_train_batches=2")
    trainer = Trainer(TrainerConfig.from_mapping({**cfg["trainer"], "stop_after": 1}))
    trainer.fit(stream, mos)
    assert len(mos.adapter_list) == 1
    stored = flat(mos.adapter_list[0])
    assert stored.abs().sum() > 0  # it trained: the zero-initialised up-projections moved
    mos.observe_classes(stream[1])
    mos.begin_experience(stream[1])
    assert torch.equal(flat(mos.cur_adapter), stored)  # not re-initialised


def test_clean_pull_moves_toward_the_mean_of_earlier_adapters():
    _, stream, mos = build_mos("strategy.pull=clean", "strategy.adapter_momentum=0.25")
    with torch.no_grad():
        for k, value in enumerate([1.0, 3.0]):  # two stored sets with constant parameters
            for p in mos.cur_adapter.parameters():
                p.fill_(value)
            mos._store_adapter()
        for p in mos.cur_adapter.parameters():
            p.fill_(10.0)
    mos.pull(mos.cur_adapter, index=2)  # mean of sets 0..1 is 2.0
    assert torch.allclose(flat(mos.cur_adapter), torch.full_like(flat(mos.cur_adapter), 0.75 * 10 + 0.25 * 2))
    before = flat(mos.adapter_list[1]).clone()
    mos.eval()
    mos.features(torch.rand(2, 3, 32, 32), k=1, pulling=True)
    assert torch.equal(flat(mos.adapter_list[1]), before)  # clean: stored adapters are never touched


def test_reference_pull_acts_before_every_block_and_rewrites_stored_adapters_at_test_time():
    _, stream, mos = build_mos("strategy.adapter_momentum=0.1")
    depth = len(mos.blocks)
    with torch.no_grad():
        for value in (1.0, 5.0):
            for p in mos.cur_adapter.parameters():
                p.fill_(value)
            mos._store_adapter()
    mos.eval()
    mos.features(torch.rand(2, 3, 32, 32), k=1, pulling=True)  # set 1 pulled toward mean(set 0) = 1.0
    expected = 1.0 + (5.0 - 1.0) * 0.9 ** depth
    assert torch.allclose(flat(mos.adapter_list[1]), torch.full_like(flat(mos.adapter_list[1]), expected))
    assert torch.equal(flat(mos.adapter_list[0]), torch.ones_like(flat(mos.adapter_list[0])))  # set 0 never moves


def test_self_refined_retrieval_follows_the_head_for_at_most_four_rounds():
    _, _, mos = build_mos()
    mos.cls2task[:] = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    n_sets, batch, classes = 5, 2, 10
    all_logits = torch.zeros(n_sets, batch, classes)
    # sample 0: prototype says task 0 -> head under set 0 says class 2 (task 1) -> set 1 says class 3 (task 1): stop
    all_logits[0, 0, 2] = 5
    all_logits[1, 0, 3] = 5
    # sample 1: a cycle 0 -> 1 -> 2 -> 3 -> 4...: stops after 4 head evaluations, on set 3's logits
    for t in range(n_sets):
        all_logits[t, 1, 2 * ((t + 1) % n_sets)] = 5 + t
    orig = torch.zeros(batch, classes)
    orig[:, 0] = 1  # both start at task 0
    out = mos.refine(orig, all_logits)
    assert torch.equal(out[0], all_logits[1, 0])
    assert torch.equal(out[1], all_logits[3, 1])


def test_classifier_alignment_fits_the_head_to_the_stored_gaussians():
    _, stream, mos = build_mos("strategy.crct_epochs=15", "strategy.ca_lr=0.05")
    d = mos.backbone.feature_dim
    for c in range(4):
        mos.seen_mask[c] = True
        mos.cls_mean[c] = torch.zeros(d).index_fill_(0, torch.tensor([c]), 4.0)
        mos.cls_cov[c] = torch.eye(d) * 0.1
    mos.align_classifier(per_class=32)
    pred = mos.head(mos.cls_mean[:4]).masked_fill(~mos.seen_mask, float("-inf")).argmax(1)
    assert pred.tolist() == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def mos_vs_finetune(tmp_path_factory):
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.mktemp("mos")
    out = {}
    for strategy in ("mos", "finetune"):
        cfg = compose_config([f"strategy={strategy}", "scenario=synthetic", "backbone=vit-tiny", "debug=fast",
                              f"results_root={root}", "trainer.progress=false", "trainer.device=cpu"])
        out[strategy] = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
    return out


@pytest.mark.e2e
def test_mos_beats_finetune_end_to_end(mos_vs_finetune):
    assert mos_vs_finetune["mos"]["metrics"]["last_acc"] > mos_vs_finetune["finetune"]["metrics"]["last_acc"]


@pytest.mark.e2e
def test_mos_costs_count_its_trained_and_stored_parameters(mos_vs_finetune):
    costs = mos_vs_finetune["mos"]["costs"]["per_experience"]
    per_set = 4 * (128 * 16 + 16 + 16 * 128 + 128)  # 4 blocks of width 128, bottleneck 16
    head = 128 * 10 + 10
    assert all(c["trainable_params"] == per_set + head for c in costs)
    assert costs[-1]["added_params"] > costs[0]["added_params"]  # one stored set per experience
    assert [c["forward_passes_per_test_image"] for c in costs] == [1, 2, 3, 4, 5]


@pytest.mark.e2e
def test_mos_resumes_to_the_same_matrix(compose, run_quiet, tmp_path):
    overrides = ["strategy=mos", "scenario=synthetic", "debug=fast", "trainer.limit_train_batches=2",
                 "strategy.crct_epochs=2"]
    a, _ = run_quiet(compose(*overrides, f"results_root={tmp_path / 'a'}"))
    run_quiet(compose(*overrides, f"results_root={tmp_path / 'b'}", "trainer.stop_after=2"))
    b, _ = run_quiet(compose(*overrides, f"results_root={tmp_path / 'b'}"))
    assert json.loads(a.read_text())["acc_matrix"] == json.loads(b.read_text())["acc_matrix"]


@pytest.mark.e2e
def test_predict_before_any_training_scores_zero_and_eval_future_runs():
    """trainer.eval_future evaluates every experience before the first one is trained (the FWT baseline): with
    no stored adapter set yet, predict returns zeros instead of indexing an empty list (issue 18, defect 2)."""
    cfg, stream, mos = build_mos("trainer.limit_train_batches=1", "strategy.crct_epochs=1")
    mos.eval()
    out = mos.predict(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, stream.info.n_classes) and not out.any()
    trainer = Trainer(TrainerConfig.from_mapping({**cfg["trainer"], "eval_future": True, "stop_after": 2}))
    history = trainer.fit(stream, mos)
    assert len(history.initial_accuracy) == len(stream)
    assert len(history.acc_matrix) == 2 and all(a is not None for a in history.acc_matrix[1])


@pytest.mark.e2e
def test_reference_mode_evaluates_with_the_training_batch_size_and_clean_mode_with_the_trainers():
    """The reference pulls rewrite the stored sets once per test batch, so the batch size is part of the method:
    the reference tests with its training batch size (AAAI25-MOS models/mos.py:91). Clean mode has no such state."""
    cfg, stream, mos = build_mos("trainer.limit_train_batches=1", "strategy.crct_epochs=1", "trainer.batch_size=6")
    trainer = Trainer(TrainerConfig.from_mapping({**cfg["trainer"], "stop_after": 1}))
    assert mos.test_batch_size is None  # nothing trained yet
    trainer.fit(stream, mos)
    assert mos.test_batch_size == 6 and trainer._eval_batch_size(mos) == 6
    mos.h["pull"] = "clean"
    assert mos.test_batch_size is None and trainer._eval_batch_size(mos) == cfg["trainer"]["eval_batch_size"]

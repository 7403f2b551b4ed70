"""LAE mechanisms: offline PET = EMA of the online PET, the frozen-PET warm-up, the max-of-softmax ensemble, the
three PET types, and end to end against finetune (costs, resume)."""
import json

import pytest
import torch
import torch.nn.functional as F

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.e2e


def build_lae(*overrides):
    cfg = compose_config(["strategy=lae", "scenario=synthetic", "debug=fast", "trainer.progress=false",
                          "trainer.device=cpu", *overrides])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    lae = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info)
    return cfg, stream, lae


def trainer_for(cfg, **extra):
    return Trainer(TrainerConfig.from_mapping({**cfg["trainer"], **extra}))


def snapshot(params):
    return [p.detach().clone() for p in params]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_offline_pet_is_the_ema_of_the_online_pet():
    cfg, stream, lae = build_lae("strategy.ema_decay=0.9", "strategy.num_freeze_epochs=0", "trainer.epochs=2")
    decay = 0.9
    log = {"hand": None, "steps": 0, "ema_at_task0": []}
    begin, after = lae.begin_experience, lae.after_optimizer_step

    def spy_begin(exp):
        groups = begin(exp)
        log["ema_at_task0"].append(lae.ema is not None)
        if lae.task == 1:  # the offline PET starts as a copy of the task-0 online PET
            log["hand"] = snapshot(lae.pet_params)
            assert same(lae.ema.offline_tensors(), log["hand"])
        return groups

    def spy_after():
        after()
        if log["hand"] is not None:
            log["hand"] = [decay * h + (1 - decay) * p.detach() for h, p in zip(log["hand"], lae.pet_params)]
            log["steps"] += 1

    lae.begin_experience, lae.after_optimizer_step = spy_begin, spy_after
    trainer_for(cfg, stop_after=3).fit(stream, lae)
    assert log["ema_at_task0"] == [False, True, True]  # no offline PET during task 0
    assert log["steps"] == 2 * 2 * 2  # tasks 1-2, 2 epochs, 2 batches of 16 (32 samples per experience)
    for off, hand, on in zip(lae.ema.offline_tensors(), log["hand"], lae.pet_params):
        assert torch.allclose(off, hand, atol=1e-6, rtol=1e-5)
    assert not same(lae.ema.offline_tensors(), snapshot(lae.pet_params))  # the online PET moved ahead


def test_warm_up_freezes_the_online_pet_for_the_first_epochs_of_later_tasks():
    cfg, stream, lae = build_lae("strategy.num_freeze_epochs=2", "trainer.epochs=4")
    marks = {}  # (task, epoch) -> (PET, newest head) at the start of that epoch; epoch 4 = end of the task
    begin_epoch, end_experience = lae.begin_epoch, lae.end_experience

    def spy_epoch(epoch, n_epochs):
        begin_epoch(epoch, n_epochs)
        marks[(lae.task, epoch)] = (snapshot(lae.pet_params), snapshot(lae.heads[-1].parameters()),
                                    [p.requires_grad for p in lae.pet_params])

    def spy_end(exp, loader):
        marks[(lae.task, 4)] = (snapshot(lae.pet_params), snapshot(lae.heads[-1].parameters()), None)
        end_experience(exp, loader)

    lae.begin_epoch, lae.end_experience = spy_epoch, spy_end
    trainer_for(cfg, stop_after=2).fit(stream, lae)
    pet = lambda t, e: marks[(t, e)][0]
    head = lambda t, e: marks[(t, e)][1]
    # task 0: never frozen, the PET trains from the first epoch
    assert all(marks[(0, e)][2] == [True] * len(lae.pet_params) for e in range(4))
    assert not same(pet(0, 0), pet(0, 1))
    # task 1: frozen (unchanged, requires_grad off) during epochs 0 and 1, while the head trains ...
    assert all(not any(marks[(1, e)][2]) for e in (0, 1))
    assert same(pet(1, 0), pet(1, 1)) and same(pet(1, 1), pet(1, 2))
    assert same(pet(1, 0), pet(0, 4))
    assert not same(head(1, 0), head(1, 1))
    # ... and trained again from epoch 2 on
    assert all(marks[(1, e)][2] == [True] * len(lae.pet_params) for e in (2, 3))
    assert not same(pet(1, 2), pet(1, 3)) and not same(pet(1, 3), pet(1, 4))


def test_ensemble_is_the_elementwise_max_of_the_online_and_offline_softmaxes():
    cfg, stream, lae = build_lae("strategy.ema_decay=0.5", "strategy.num_freeze_epochs=0", "trainer.epochs=2")
    trainer_for(cfg, stop_after=2).fit(stream, lae)
    lae.eval()
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        p_on = lae.probs(lae.backbone(x))
        online = snapshot(lae.pet_params)
        for p, off in zip(lae.pet_params, lae.ema.offline_tensors()):  # the offline model, built by hand
            p.copy_(off)
        p_off = lae.probs(lae.backbone(x))
        for p, on in zip(lae.pet_params, online):
            p.copy_(on)
    out = lae.predict(x)
    assert torch.equal(out, torch.maximum(p_on, p_off))
    seen = lae.seen_mask
    assert torch.allclose(p_on[:, seen].sum(1), torch.ones(16)) and torch.equal(p_on[:, ~seen], p_on[:, ~seen] * 0)
    assert (p_on > p_off).any() and (p_off > p_on).any()  # each expert wins for some class
    assert torch.equal(out[p_on > p_off], p_on[p_on > p_off])
    assert torch.equal(out[p_off > p_on], p_off[p_off > p_on])
    assert lae.forward_passes_per_test_image == 2
    # task-IL: the ensembled output restricted to the sample's own task
    tid = torch.tensor([0, 1] * 8)
    out_t = lae.predict(x, tid)
    own = lae.cls2task[None, :] == tid[:, None]
    assert torch.equal(out_t[own], out[own]) and torch.isinf(out_t[~own]).all()


def test_before_the_offline_pet_exists_prediction_is_the_online_softmax():
    cfg, stream, lae = build_lae()
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(lae.predict(x), torch.zeros(4, 10))  # nothing learnt yet (eval_future)
    trainer_for(cfg, stop_after=1).fit(stream, lae)
    assert lae.ema is None and lae.forward_passes_per_test_image == 1
    with torch.no_grad():
        assert torch.equal(lae.predict(x), lae.probs(lae.backbone(x)))


@pytest.mark.parametrize("pet, per_block", [
    ("adapter", 128 * 5 + 5 + 5 * 128 + 128 + 1),   # down, up, learnable scale
    ("lora", 2 * (5 * 128 + 128 * 5) + 2),           # K and V pairs, one scale each
    ("prefix", 2 * 10 * 128 + 2),                    # key and value tokens, one scale each
])
def test_each_pet_type_builds_and_trains(pet, per_block):
    cfg, stream, lae = build_lae(f"strategy.pet={pet}")
    assert lae.blocks == [0, 1, 2, 3]  # adapt_blocks 0..4 on the 4-block vit-tiny
    assert sum(p.numel() for p in lae.pet_params) == 4 * per_block
    frozen = [p for p in lae.backbone.parameters() if all(p is not q for q in lae.pet_params)]
    frozen_before, pet_before = snapshot(frozen), snapshot(lae.pet_params)
    trainer_for(cfg, stop_after=1).fit(stream, lae)
    assert same(frozen, frozen_before)                   # the pre-trained weights never move
    assert all(not torch.equal(a, b) for a, b in zip(lae.pet_params, pet_before))  # every PET tensor trained
    if pet == "lora":  # the reference's KVLoRA: F.linear(x, W + [0; s_k B_k A_k; s_v B_v A_v], b)
        qkv = lae.backbone.model.blocks[0].attn.qkv
        x = torch.randn(3, 7, 128)
        delta = torch.cat([torch.zeros(128, 128)] + [qkv.scaling[i] * qkv.lora_B[i] @ qkv.lora_A[i] for i in (0, 1)])
        with torch.no_grad():
            assert torch.allclose(qkv(x), F.linear(x, qkv.weight + delta, qkv.bias), atol=1e-5)
            assert torch.allclose(qkv.delta_weight(), delta)


@pytest.fixture(scope="module")
def lae_vs_finetune(tmp_path_factory):
    """debug=fast with 5 epochs (the reference's CIFAR count) and 2 frozen-PET epochs. Under plain debug=fast
    (one epoch of 2 steps per experience; the PET frozen throughout tasks >= 1) the per-task heads, trained in
    isolation, are not calibrated against each other and class-IL collapses to one class (10%, finetune's value)."""
    from cl.app.experiment import run_experiment

    root = tmp_path_factory.mktemp("lae")
    out = {}
    for strategy, extra in (("lae", ["strategy.num_freeze_epochs=2"]), ("finetune", [])):
        cfg = compose_config([f"strategy={strategy}", "scenario=synthetic", "backbone=vit-tiny", "debug=fast",
                              "trainer.epochs=5", *extra, f"results_root={root}", "trainer.progress=false",
                              "trainer.device=cpu"])
        out[strategy] = json.loads(run_experiment(cfg, out=lambda *a: None).read_text())
    return out


def test_lae_beats_finetune_end_to_end(lae_vs_finetune):
    lae, ft = (lae_vs_finetune[k]["metrics"]["last_acc"] for k in ("lae", "finetune"))
    print(f"last accuracy: lae {lae:.2f}  finetune {ft:.2f}")
    assert lae > ft


def test_lae_costs_count_the_online_pet_and_heads(lae_vs_finetune):
    costs = lae_vs_finetune["lae"]["costs"]["per_experience"]
    pet = 4 * (128 * 5 + 5 + 5 * 128 + 128 + 1)  # adapters on the 4 blocks of vit-tiny
    head = 128 * 2 + 2                            # the newest task's head (2 classes)
    assert all(c["trainable_params"] == pet + head for c in costs)
    assert [c["added_params"] for c in costs] == [pet + head] + [2 * pet + head * (t + 1) for t in range(1, 5)]
    assert [c["forward_passes_per_test_image"] for c in costs] == [1, 2, 2, 2, 2]


def test_lae_resumes_to_the_same_matrix(compose, run_quiet, tmp_path):
    overrides = ["strategy=lae", "scenario=synthetic", "debug=fast", "trainer.epochs=2",
                 "strategy.num_freeze_epochs=1", "strategy.ema_decay=0.9"]
    a, _ = run_quiet(compose(*overrides, f"results_root={tmp_path / 'a'}"))
    run_quiet(compose(*overrides, f"results_root={tmp_path / 'b'}", "trainer.stop_after=2"))
    b, _ = run_quiet(compose(*overrides, f"results_root={tmp_path / 'b'}"))
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["acc_matrix"] == rb["acc_matrix"]
    assert ra["task_il_matrix"] == rb["task_il_matrix"]


def test_the_result_records_the_online_offline_and_ensemble_accuracies(lae_vs_finetune):
    """run_metrics: the members scored on the seen test sets at the end of the last experience; the ensemble's
    figure is the run's last accuracy (the same predictions, recomputed), the members are the paper's ablation."""
    m = lae_vs_finetune["lae"]["metrics"]
    assert {"lae_online_acc", "lae_offline_acc", "lae_ensemble_acc"} <= m.keys()
    assert m["lae_ensemble_acc"] == pytest.approx(m["last_acc"], abs=1e-6)
    assert all(0 <= m[k] <= 100 for k in ("lae_online_acc", "lae_offline_acc"))


def test_member_accuracies_can_be_switched_off(compose, run_quiet):
    path, _ = run_quiet(compose("strategy=lae", "scenario=synthetic", "debug=fast", "strategy.record_members=false",
                                "trainer.stop_after=1"))
    assert not any(k.startswith("lae_") for k in json.loads(path.read_text())["metrics"])

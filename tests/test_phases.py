"""The trainer's optimisation routine for strategies with several phases (cl/engine/phases.py): it steps the optimiser it
is given, builds one from the trainer config otherwise, polls the run's stop check before every step, stops on a
non-finite loss, honours limit_train_batches and shows a bar; SEMA's phases run through it and stop within a step."""
import json
import os
import signal

import pytest
import torch
from torch import nn

import scenarios
import strategies
from cl.models import backbones
from cl.engine import progress
from cl.app.cli import compose_config
from cl.engine.errors import NonFiniteLossError, RunInterrupted
from cl.engine.phases import Optimiser
from cl.engine.progress import set_experience, stop_checks
from cl.engine.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.unit


def linear_problem(n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nn.Linear(3, 1), [(torch.randn(4, 3, generator=g), torch.randn(4, 1, generator=g)) for _ in range(n_batches)]


def mse(model):
    return lambda batch: nn.functional.mse_loss(model(batch[0]), batch[1])


def test_a_phase_steps_the_optimiser_it_is_given_once_per_batch_and_its_schedule_once_per_epoch():
    model, data = linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    before = model.weight.detach().clone()
    Optimiser(TrainerConfig(progress=False), "cpu").phase(mse(model), data, opt=opt, sched=sched, epochs=2)
    assert len(steps) == 12 and opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert not torch.equal(model.weight, before)


def test_a_phase_without_an_optimiser_builds_the_trainers_with_its_overrides():
    """Same updates as SGD(momentum, weight decay) + cosine written out by hand, at the phase's lr and epochs."""
    model, data = linear_problem()
    ref = nn.Linear(3, 1)
    ref.load_state_dict(model.state_dict())
    cfg = TrainerConfig(lr=1.0, epochs=9, momentum=0.5, weight_decay=0.01, progress=False)
    Optimiser(cfg, "cpu").phase(mse(model), data, params=model.parameters(), lr=0.05, epochs=3)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.5, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    for _ in range(3):
        for batch in data:
            loss = mse(ref)(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    assert torch.equal(model.weight, ref.weight) and torch.equal(model.bias, ref.bias)
    with pytest.raises(TypeError, match="cannot override 'seed'"):
        Optimiser(cfg, "cpu").phase(mse(model), data, params=model.parameters(), seed=1)


def test_a_pending_stop_raises_from_inside_a_phase_before_the_next_step():
    model, data = linear_problem()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    with stop_checks(lambda: "SIGTERM" if len(steps) >= 3 else None, enabled=False):
        set_experience(2)
        with pytest.raises(RunInterrupted) as info:
            Optimiser(TrainerConfig(progress=False), "cpu").phase(mse(model), data, opt=opt, epochs=2,
                                                                  desc="sema: rd phase")
    assert len(steps) == 3  # polled before every step: none after the signal
    assert info.value.phase == "sema: rd phase" and info.value.experience == 2 and info.value.state is None


def test_a_non_finite_loss_stops_the_phase():
    model, data = linear_problem()
    nan_at = {"n": 0}

    def step(batch):
        nan_at["n"] += 1
        loss = mse(model)(batch)
        return loss * float("nan") if nan_at["n"] == 3 else loss

    with pytest.raises(NonFiniteLossError, match="experience 4, epoch 0"):
        Optimiser(TrainerConfig(progress=False, log_every=2), "cpu", experience=4).phase(
            step, data, params=model.parameters(), epochs=1)
    assert nan_at["n"] == 4  # read back every log_every = 2 steps


def test_limit_train_batches_is_the_trainers_unless_the_phase_lifts_it():
    model, data = linear_problem()
    for overrides, expected in (({}, 2 * 2), ({"limit_train_batches": 5}, 2 * 5),
                                ({"limit_train_batches": None}, 2 * 6)):
        seen = []
        Optimiser(TrainerConfig(progress=False, limit_train_batches=2), "cpu").phase(
            lambda b: (seen.append(1), mse(model)(b))[1], data, params=model.parameters(), epochs=2, **overrides)
        assert len(seen) == expected, overrides
    # data drawn anew every epoch (MOS's sampled features): a callable epoch -> batches
    epochs = []
    Optimiser(TrainerConfig(progress=False), "cpu").phase(
        mse(model), lambda e: (epochs.append(e), data)[1], params=model.parameters(), epochs=3)
    assert epochs == [0, 1, 2]


def test_a_phase_shows_a_bar_named_after_it(monkeypatch, capsys):
    monkeypatch.setattr(progress, "BAR_DELAY_S", 0.0)
    model, data = linear_problem()
    Optimiser(TrainerConfig(progress=True), "cpu").phase(mse(model), data, params=model.parameters(), epochs=1,
                                                         desc="mos: classifier alignment")
    err = capsys.readouterr().err
    assert "mos: classifier alignment" in err and "/6" in err
    Optimiser(TrainerConfig(progress=False), "cpu").phase(mse(model), data, params=model.parameters(), epochs=1,
                                                          desc="quiet phase")
    assert "quiet phase" not in capsys.readouterr().err


def test_a_watched_loader_is_not_watched_twice_and_keeps_its_name():
    from cl.engine.data import make_loader

    model = nn.Linear(3, 1)
    loader = make_loader(torch.utils.data.TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=2,
                         shuffle=False, desc="sema: fit experience 1")
    polls = []
    with stop_checks(lambda: polls.append(1), enabled=False):
        Optimiser(TrainerConfig(progress=False), "cpu").phase(mse(model), loader, params=model.parameters())
    assert len(polls) == 4 and loader.desc == "sema: fit experience 1"


# --- SEMA --------------------------------------------------------------------------------------------------
SEMA = ["strategy=sema", "scenario=synthetic", "scenario.synthetic.n_classes=6", "debug=fast", "strategy.rd_dim=16",
        "strategy.rd_epoch=1", "strategy.exp_threshold=1"]  # 3 experiences; threshold 1 expands from experience 1


@pytest.mark.e2e
def test_sema_stops_within_a_step_of_a_stop_during_its_functional_phase():
    cfg = compose_config([*SEMA, "trainer.progress=false", "trainer.device=cpu"])
    torch.manual_seed(0)
    stream = scenarios.build(cfg["scenario"])
    sema = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    forwards = []
    # one training-mode head forward per functional step
    sema.head.register_forward_hook(lambda m, *a: forwards.append(1) if m.training else None)
    trainer = Trainer(TrainerConfig.from_mapping(cfg["trainer"]))
    trainer.should_stop = lambda: "SIGTERM" if forwards else None  # from the first step on
    with pytest.raises(RunInterrupted) as info:
        trainer.fit(stream, sema)
    assert len(forwards) == 1
    assert info.value.experience == 0 and info.value.phase == "exp 1 func" and info.value.state is None


@pytest.mark.e2e
def test_sema_interrupted_inside_a_phase_restarts_that_experience_and_ends_as_an_unbroken_run(
        compose, run_quiet, monkeypatch, tmp_path):
    """A stop inside a non-SGD phase saves no mid-experience state: the experience restarts from the previous
    experience's checkpoint on resume (as before this routine), and the run ends with the same matrix."""
    from strategies.sema import SEMA as SemaStrategy

    over = [*SEMA, "scenario.synthetic.n_classes=4"]  # 2 experiences: the stop is inside the last one
    reference, _ = run_quiet(compose(*over, f"results_root={tmp_path / 'a'}"))
    cfg = compose(*over, f"results_root={tmp_path / 'b'}")
    original, calls = SemaStrategy._train_rd, {"n": 0}

    def signal_then_train(self, *args, **kwargs):  # the RD phase of experience 1's first expansion
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(SemaStrategy, "_train_rd", signal_then_train)
        with pytest.raises(RunInterrupted) as info:
            run_quiet(cfg)
    assert info.value.experience == 1 and info.value.epoch is None and info.value.phase.startswith("exp 2 rd")
    path, lines = run_quiet(cfg)
    assert any("after experience 0" in line for line in lines)
    a, b = json.loads(reference.read_text()), json.loads(path.read_text())
    assert b["acc_matrix"] == a["acc_matrix"]
    assert b["strategy_info"]["growth"] == a["strategy_info"]["growth"]

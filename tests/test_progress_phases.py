"""Every data pass outside the SGD loop is watched (cl/progress.watch through cl/data.make_loader): a stop
signal is honoured within one batch there too, and the interruption names the phase."""
import pytest
import torch
from torch import nn

from cl.engine.data import make_loader
from cl.engine.errors import RunInterrupted
from cl.engine.progress import set_experience, stop_checks, watch
from cl.engine.strategy import Strategy
from cl.engine.trainer import Trainer, TrainerConfig
from test_trainer import Identity, toy_stream

pytestmark = pytest.mark.unit


def test_watch_polls_the_stop_check_between_items():
    asked = []

    def stop():
        asked.append(1)
        return "SIGTERM" if len(asked) > 2 else None

    seen = []
    with stop_checks(stop, enabled=False):
        set_experience(4)
        with pytest.raises(RunInterrupted) as info:
            for item in watch(range(10), desc="class statistics"):
                seen.append(item)
    assert seen == [0, 1] and info.value.phase == "class statistics" and info.value.experience == 4
    assert "during class statistics" in str(info.value)
    assert list(watch(range(3), desc="outside a run")) == [0, 1, 2]  # no stop check outside a run


def test_a_loader_is_watched_unless_told_not_to():
    data = torch.utils.data.TensorDataset(torch.zeros(8, 1), torch.zeros(8))
    with stop_checks(lambda: "SIGTERM", enabled=False):
        with pytest.raises(RunInterrupted):
            next(iter(make_loader(data, batch_size=2, shuffle=False)))
        assert len(list(make_loader(data, batch_size=2, shuffle=False, desc=None))) == 4


class SlowStatistics(Strategy):
    """Trains nothing; its end-of-experience pass reads every batch (as prototype and statistics passes do)."""

    uses_sgd = False

    def setup(self, backbone, info):
        super().setup(backbone, info)
        self.batches = 0

    def fit_experience(self, exp, loader, device):
        pass

    def end_experience(self, exp, loader):
        for _ in loader:
            self.batches += 1

    def predict(self, x, task_id=None):
        return torch.zeros(len(x), 4)


def test_a_stop_during_a_strategy_pass_interrupts_the_run_there():
    strategy = SlowStatistics()
    strategy.setup(Identity(), toy_stream().info)
    trainer = Trainer(TrainerConfig(batch_size=2, progress=False, device="cpu"))
    trainer.should_stop = lambda: "SIGTERM" if strategy.batches >= 2 else None
    with pytest.raises(RunInterrupted) as info:
        trainer.fit(toy_stream(), strategy)
    assert strategy.batches == 2  # stopped within one batch of the signal, not at the end of the pass
    assert info.value.experience == 0 and info.value.phase == "base: end of experience 1"

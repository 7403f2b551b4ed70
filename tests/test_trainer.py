"""The trainer calls every hook in order, owns the optimiser unless the strategy supplies one, and scores
class-IL and task-IL accuracy correctly from known predictions."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from cl.engine.kinds import EvalProtocol
from cl.engine.online import OnlineAdaptation
from cl.engine.stream import Experience, Stream, StreamInfo
from cl.engine.strategy import Strategy
from cl.engine.trainer import Trainer, TrainerConfig

pytestmark = pytest.mark.unit


class Identity(nn.Module):
    """A 'backbone' that passes a 4-d one-hot-ish input through as its feature."""

    input_size, in_chans, feature_dim = 2, 1, 4

    def forward(self, x):
        return x.flatten(1)


def toy_stream(kind="class_il", protocol=None) -> Stream:
    """Two experiences, classes {0,1} then {2,3}; a sample of class c is a 2x2 image with pixel c lit."""
    def data(classes, n=4):
        ys = torch.tensor([c for c in classes for _ in range(n)])
        xs = (F.one_hot(ys, 4).float().view(-1, 1, 2, 2) * 255).to(torch.uint8)
        return TensorDataset(xs, ys)

    exps = [Experience(i, data(c), data(c), c, kind, task_id=i) for i, c in enumerate([[0, 1], [2, 3]])]
    info = StreamInfo("toy", kind, 4, 2, [0, 1, 2, 3], input_shape=(1, 2, 2),
                      classes_per_experience=[[0, 1], [2, 3]])
    return Stream(exps, info, protocol)


class Recorder(Strategy):
    """Predicts with a fixed rule and records each hook call."""

    def __init__(self, rule, **kw):
        super().__init__(**kw)
        self.rule, self.calls = rule, []

    def setup(self, backbone, info):
        super().setup(backbone, info)
        self.w = nn.Parameter(torch.zeros(4))

    def begin_experience(self, exp):
        self.calls.append(("begin", exp.index, self.seen_mask.tolist()))
        return [{"params": [self.w]}]

    def begin_epoch(self, epoch, n_epochs):
        self.calls.append(("epoch", epoch, n_epochs))

    def configure_optimizer(self, groups):
        self.calls.append(("configure",))
        return torch.optim.SGD(groups, lr=0.1)

    def train_step(self, batch):
        self.calls.append(("step",))
        return (self.w * batch.x.flatten(1)).sum() * 0 + self.w.pow(2).sum() + 1.0

    def before_optimizer_step(self):
        assert self.w.grad is not None  # gradients exist and can be edited here
        self.calls.append(("before",))

    def after_optimizer_step(self):
        self.calls.append(("after",))

    def end_experience(self, exp, loader):
        self.calls.append(("end", exp.index))

    def predict(self, x, task_id=None):
        return self.rule(x.flatten(1))


def cfg(**kw):
    return TrainerConfig(**{"epochs": 2, "batch_size": 4, "progress": False, "device": "cpu", **kw})


def test_hooks_are_called_in_order_and_every_step():
    stream = toy_stream()
    s = Recorder(lambda f: f)
    s.setup(Identity(), stream.info)
    Trainer(cfg()).fit(stream, s)
    kinds = [c[0] for c in s.calls]
    assert kinds[:2] == ["begin", "configure"]
    # 8 samples / batch 4 = 2 steps per epoch, 2 epochs: each epoch opens with begin_epoch, each step -> before -> after
    first_end = kinds.index("end")
    assert kinds[2:first_end] == (["epoch"] + ["step", "before", "after"] * 2) * 2
    assert [c for c in s.calls if c[0] == "epoch"][:2] == [("epoch", 0, 2), ("epoch", 1, 2)]
    assert s.calls[0][2] == [True, True, False, False]  # classes observed before begin_experience
    assert ("end", 1) in s.calls


def test_perfect_predictor_scores_100_and_masked_future_classes():
    stream = toy_stream()
    s = Recorder(lambda f: f)  # logits = one-hot of the true class
    s.setup(Identity(), stream.info)
    hist = Trainer(cfg(epochs=1)).fit(stream, s)
    assert hist.acc_matrix == [[100.0, None], [100.0, 100.0]]
    assert hist.test_counts == [8, 8]


def test_class_il_vs_task_il_accuracy_by_logit_masking():
    stream = toy_stream()
    # Always votes for class 3 first, then the true class: wrong in class-IL once class 3 is seen,
    # right in task-IL for experience 0 (class 3 is masked out of its task).
    s = Recorder(lambda f: f + torch.tensor([0.0, 0.0, 0.0, 2.0]))
    s.setup(Identity(), stream.info)
    hist = Trainer(cfg(epochs=1)).fit(stream, s)
    assert hist.acc_matrix[0][0] == 100.0       # class 3 not seen yet: masked in class-IL
    assert hist.acc_matrix[1] == [0.0, 50.0]    # class 3 seen: wins for every sample except its own
    assert hist.task_il_matrix[1] == [100.0, 50.0]


def test_eval_future_fills_the_upper_triangle_and_a_baseline():
    stream = toy_stream()
    s = Recorder(lambda f: f)
    s.setup(Identity(), stream.info)
    hist = Trainer(cfg(epochs=1, eval_future=True)).fit(stream, s)
    assert hist.acc_matrix[0][1] == 0.0          # future classes are masked in class-IL
    assert hist.task_il_matrix[0][1] == 100.0    # but scored in task-IL
    assert hist.initial_accuracy == [100.0, 100.0]


class Prototype(Strategy):
    uses_sgd = False

    def setup(self, backbone, info):
        super().setup(backbone, info)
        self.register_buffer("protos", torch.zeros(4, 4))

    def begin_experience(self, exp):
        return []

    def fit_experience(self, exp, loader, device):
        for x, y in loader:
            self.protos.index_add_(0, y, x.flatten(1).float())

    def predict(self, x, task_id=None):
        return x.flatten(1) @ self.protos.T


def test_non_sgd_strategies_use_fit_experience():
    stream = toy_stream()
    s = Prototype()
    s.setup(Identity(), stream.info)
    hist = Trainer(cfg()).fit(stream, s)
    assert hist.acc_matrix[-1] == [100.0, 100.0]
    assert hist.costs[0]["trainable_params"] == 0


def test_stop_after_and_start_continue_the_same_history():
    stream = toy_stream()
    s = Recorder(lambda f: f)
    s.setup(Identity(), stream.info)
    hist = Trainer(cfg(stop_after=1)).fit(stream, s)
    assert len(hist.acc_matrix) == 1
    hist = Trainer(cfg()).fit(stream, s, history=hist, start=1)
    assert len(hist.acc_matrix) == 2 and len(hist.costs) == 2


def test_costs_have_the_contract_fields():
    stream = toy_stream()
    s = Recorder(lambda f: f)
    s.setup(Identity(), stream.info)
    costs = Trainer(cfg()).fit(stream, s).costs
    for c in costs:
        for key in ("wall_s", "train_images_per_s", "eval_images_per_s", "forward_passes_per_test_image",
                    "peak_memory_mb", "trainable_params", "added_params"):
            assert key in c
        assert c["trainable_params"] == 4 and c["train_images"] == 16


@pytest.mark.e2e
def test_fwt_uses_the_matching_baseline(compose, run_quiet):
    import json

    path, _ = run_quiet(compose("strategy=simplecil", "scenario=synthetic-domains", "debug=fast",
                                "trainer.eval_future=true"))
    r = json.loads(path.read_text())
    assert all(v is not None for row in r["acc_matrix"] for v in row)
    assert len(r["initial_task_il_accuracy"]) == len(r["acc_matrix"])
    from cl.engine import metrics

    assert r["metrics"]["fwt"] == metrics.forward_transfer(r["acc_matrix"], r["initial_accuracy"])
    assert r["metrics"]["fwt_task_il"] == metrics.forward_transfer(r["task_il_matrix"], r["initial_task_il_accuracy"])


@pytest.mark.e2e
def test_class_il_runs_report_no_class_il_fwt(compose, run_quiet):
    import json

    path, _ = run_quiet(compose("strategy=simplecil", "scenario=synthetic", "debug=fast", "trainer.eval_future=true"))
    m = json.loads(path.read_text())["metrics"]
    assert "fwt" not in m and "fwt_task_il" in m


class OnlineAdapter(OnlineAdaptation, Recorder):
    """A test-time strategy: predicts, then 'adapts' by counting the batches it has seen."""

    def adapt(self, x):
        self.calls.append(("adapt", x.shape[0]))
        return self.predict(x)


def test_tta_streams_are_scored_online_with_adapt_and_no_training():
    stream = toy_stream(kind="tta", protocol=EvalProtocol(loop="online"))
    s = OnlineAdapter(lambda f: f)
    s.setup(Identity(), stream.info)
    hist = Trainer(cfg(batch_size=3)).fit(stream, s)
    kinds = [c[0] for c in s.calls]
    assert "step" not in kinds and "configure" not in kinds
    assert [c[1] for c in s.calls if c[0] == "adapt"] == [3, 3, 2, 3, 3, 2]  # fixed order, every batch once
    assert hist.acc_matrix == [[100.0, None], [None, 100.0]]
    assert "adapt_images_per_s" in hist.costs[0]


def test_a_non_finite_loss_stops_with_the_step_named():
    import pytest

    from cl.engine.trainer import NonFiniteLossError

    class Exploding(Recorder):
        def train_step(self, batch):
            loss = super().train_step(batch)
            return loss * float("nan") if int(self.experiences_seen) == 2 else loss

    stream = toy_stream()
    s = Exploding(lambda f: f)
    s.setup(Identity(), stream.info)
    finished = []
    trainer = Trainer(cfg(log_every=1), on_experience_end=lambda i, st, h: finished.append(i))
    with pytest.raises(NonFiniteLossError, match="experience 1, epoch 0, step 1"):
        trainer.fit(stream, s)
    assert finished == [0]


@pytest.mark.e2e
def test_a_failed_run_keeps_its_finished_experiences(compose, run_quiet, monkeypatch):
    import json

    import pytest

    from cl.engine.trainer import NonFiniteLossError
    from strategies.finetune import Finetune

    original = Finetune.train_step

    def nan_in_third(self, batch):
        loss = original(self, batch)
        return loss * float("nan") if int(self.experiences_seen) == 3 else loss

    monkeypatch.setattr(Finetune, "train_step", nan_in_third)
    cfg_ = compose("strategy=finetune", "scenario=synthetic", "debug=fast", "trainer.log_every=1")
    with pytest.raises(NonFiniteLossError):
        run_quiet(cfg_)
    from cl.engine.results import RunDir, config_hash

    result = json.loads(RunDir(cfg_["results_root"], config_hash(cfg_)).result_path.read_text())
    assert result["status"] == "failed" and len(result["acc_matrix"]) == 2
    assert result["failure"]["type"] == "non_finite_loss" and result["failure"]["experience"] == 2


def test_a_lone_last_sample_is_dropped_where_batchnorm_would_refuse_it():
    """`python run.py seed=1` on digits: an experience whose training set is 1 more than a multiple of the batch
    size trained a batch of one sample through the ResNet's BatchNorm, which torch refuses."""
    from cl.engine.strategy import Strategy as Base

    class BNNet(Base):
        def setup(self, backbone, info):
            super().setup(backbone, info)
            self.net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4))

        def begin_experience(self, exp):
            return [{"params": list(self.net.parameters())}]

        def train_step(self, batch):
            return F.cross_entropy(self.net(batch.x.flatten(1)), batch.y)

        def predict(self, x, task_id=None):
            return self.net(x.flatten(1))

    strategy = BNNet()
    stream = toy_stream()  # 8 training samples per experience
    strategy.setup(Identity(), stream.info)
    Trainer(TrainerConfig(batch_size=7, progress=False, device="cpu")).fit(stream, strategy)  # 8 = 7 + 1

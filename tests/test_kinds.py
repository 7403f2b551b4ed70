"""Scenario kinds are declared records (cl/engine/kinds.py, scenarios.KINDS): the trainer and the run code read the
declared protocol and the kind's functions, never a kind's name or a stream's or strategy's optional attribute."""
import ast
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import scenarios
from cl.engine import stream as cl_stream
from cl.engine.errors import ConfigError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Experience, Stream, StreamInfo
from cl.engine.strategy import Strategy
from cl.engine.trainer import History, Trainer, TrainerConfig

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
ENGINE_FILES = ("cl/engine/trainer.py", "cl/app/experiment.py", "cl/engine/online.py")


def _kind_branches(path: Path) -> list[str]:
    """`kind == ...` comparisons, getattr/hasattr on a stream or strategy, and kind names as string constants."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                name = side.attr if isinstance(side, ast.Attribute) else getattr(side, "id", None)
                if name == "kind":
                    found.append(f"{path.name}:{node.lineno}: comparison on a kind")
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr") and node.args:
            target = node.args[0]
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
            if name in ("stream", "strategy", "strat", "exp", "info"):
                found.append(f"{path.name}:{node.lineno}: {node.func.id}({name}, ...)")
        if isinstance(node, ast.Constant) and node.value in set(cl_stream.KINDS) - {"class_il"}:
            found.append(f"{path.name}:{node.lineno}: kind name {node.value!r}")
    return found


@pytest.mark.parametrize("rel", ENGINE_FILES)
def test_the_engine_loop_and_the_run_have_no_kind_branches(rel):
    assert _kind_branches(ROOT / rel) == []


def test_the_check_sees_a_kind_branch(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("if stream.info.kind == 'tta':\n    x = getattr(stream, 'eval_initial', False)\n"
                   "y = hasattr(strategy, 'adapt_costs')\n")
    assert len(_kind_branches(bad)) == 4  # the comparison, its 'tta', the getattr and the hasattr


def test_the_engine_imports_no_scenario_or_strategy_module():
    for rel in ("cl/engine/kinds.py", "cl/engine/kind_metrics.py", "cl/engine/online.py", "cl/engine/stream.py", "cl/engine/trainer.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("scenarios", "strategies") for n in names), (rel, names)


def _history(k: int = 2) -> History:
    return History(acc_matrix=[[80.0, 10.0], [60.0, 70.0]][:k], task_il_matrix=[[90.0, 50.0], [80.0, 75.0]][:k],
                   test_counts=[10, 10], initial_accuracy=[90.0, 85.0], initial_task_il_accuracy=[95.0, 90.0],
                   costs=[{"domain": "a_5", "time_per_batch_s": 0.1, "wall_s": 1.0},
                          {"domain": "b_5", "time_per_batch_s": 0.2, "wall_s": 1.0}][:k])


@pytest.mark.parametrize("name", list(scenarios.KINDS))
def test_every_registered_kind_declares_builder_protocol_metrics_and_lines(name):
    kind = scenarios.get_kind(name)
    assert isinstance(kind, Kind) and kind.name == name
    assert isinstance(kind.protocol, EvalProtocol) and kind.protocol.eval_experiences is None
    assert callable(kind.build) or isinstance(kind.build, str)
    h = _history()
    m = kind.compute_metrics(h)
    assert m and all(isinstance(k, str) for k in m)
    result = {"metrics": m, "costs": {"total_wall_s": 2.0}, "acc_matrix": h.acc_matrix,
              "stream": {"kind": name, "extra": {"domains": ["a_5", "b_5"], "eval_groups": ["request_0", "retained"]}},
              "config": {"scenario": {"kind": name}}}
    assert isinstance(kind.summary_line(result), str) and "wall 2.0s" in kind.summary_line(result)
    assert isinstance(kind.score_line(h, 1), str)
    rows, cols = kind.labels(result)
    assert rows is None or len(rows) == len(h.acc_matrix)


def test_the_registry_covers_every_experience_kind():
    assert set(scenarios.KINDS) == set(cl_stream.KINDS)
    with pytest.raises(ConfigError, match="scenario kind"):
        scenarios.get_kind("class-il")


def test_built_streams_carry_their_kinds_protocol_and_slices_keep_it():
    base = {"dataset": "digits", "init_cls": 2, "increment": 2, "limit_per_class": 3}
    cil = scenarios.build({**base, "kind": "class_il"})
    til = scenarios.build({**base, "kind": "task_il"})
    assert cil.protocol == EvalProtocol() and til.protocol.task_ids and til[:2].protocol is til.protocol


def _toy(protocol=None) -> Stream:
    ys = torch.tensor([0, 1, 0, 1])
    xs = (torch.nn.functional.one_hot(ys, 4).float().view(-1, 1, 2, 2) * 255).to(torch.uint8)
    data = TensorDataset(xs, ys)
    info = StreamInfo("toy", "class_il", 4, 1, [0, 1, 2, 3], input_shape=(1, 2, 2), classes_per_experience=[[0, 1]])
    return Stream([Experience(0, data, data, [0, 1], "class_il")], info, protocol)


class _Flat(nn.Module):
    input_size, in_chans, feature_dim = 2, 1, 4

    def forward(self, x):
        return x.flatten(1)


class _TaskRecorder(Strategy):
    uses_sgd = False

    def begin_experience(self, exp):
        self.task_ids = []
        return []

    def fit_experience(self, exp, loader, device):
        pass

    def predict(self, x, task_id=None):
        self.task_ids.append(task_id)
        return x.flatten(1)


@pytest.mark.parametrize("task_ids", [False, True])
def test_task_ids_reach_predict_only_when_the_protocol_declares_them(task_ids):
    stream = _toy(EvalProtocol(task_ids=task_ids))
    s = _TaskRecorder()
    s.setup(_Flat(), stream.info)
    Trainer(TrainerConfig(epochs=1, batch_size=4, progress=False, device="cpu", feature_cache=False)).fit(stream, s)
    assert all((t is not None) == task_ids for t in s.task_ids)


def test_the_online_loop_refuses_a_strategy_without_the_online_contract():
    stream = _toy(EvalProtocol(loop="online"))
    s = _TaskRecorder()
    s.setup(_Flat(), stream.info)
    with pytest.raises(ConfigError, match="online-adaptation contract"):
        Trainer(TrainerConfig(epochs=1, batch_size=4, progress=False, device="cpu")).fit(stream, s)


def test_an_unknown_loop_is_refused():
    with pytest.raises(ValueError, match="unknown evaluation loop"):
        EvalProtocol(loop="replay")

"""What a scenario kind declares, as engine records: how its streams are evaluated (`EvalProtocol`, carried by
every `Stream`) and what the kind owns besides (`Kind`: builder, metrics, console lines), registered once per kind
in `scenarios/` (`scenarios.KINDS`).

Why records and not branches: the trainer and the run code read declared fields only, so a new kind (or a change
to one) is one registration, never a `kind == ...` edit in the engine. This module imports no scenario or
strategy code; a `Kind`'s callables may be given as `"module:attr"` strings, imported when first used.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

LOOPS = ("sgd", "online")


@dataclass(frozen=True)
class EvalProtocol:
    """How the trainer runs and scores a stream.

    loop: `sgd`: train each experience (SGD steps or the strategy's `fit_experience`), then evaluate; `online`:
        no training phase, each experience's test batches are predicted and then adapted on, in a fixed order
        (`cl.engine.online.OnlineLoop`, for strategies with the `OnlineAdaptation` contract).
    eval_initial: evaluate the untouched model once before the first experience (the reference a kind's metrics
        need, e.g. the original model of a forgetting stream); `trainer.eval_future` asks for the same pass.
    task_ids: `predict` receives each test sample's task id, and training batches carry it (task-IL).
    eval_experiences: fixed test groups scored after every experience (a forgetting stream's class groups);
        None: the experiences seen so far (all of them with `trainer.eval_future`).
    """

    loop: str = "sgd"
    eval_initial: bool = False
    task_ids: bool = False
    eval_experiences: tuple | None = None

    def __post_init__(self) -> None:
        if self.loop not in LOOPS:
            raise ValueError(f"unknown evaluation loop {self.loop!r}; expected one of {LOOPS}")
        if self.eval_experiences is not None and not isinstance(self.eval_experiences, tuple):
            object.__setattr__(self, "eval_experiences", tuple(self.eval_experiences))

    def with_groups(self, eval_experiences: Sequence) -> "EvalProtocol":
        """This protocol, scoring the given fixed groups after every experience."""
        return replace(self, eval_experiences=tuple(eval_experiences))


DEFAULT_PROTOCOL = EvalProtocol()


def _resolve(obj: Any) -> Any:
    if isinstance(obj, str):
        from cl.engine.lazy import load

        return load(obj)
    return obj


@dataclass(frozen=True)
class Kind:
    """Everything one scenario kind owns, in one record.

    build: `(cfg, data_root) -> Stream` (or its `"module:attr"`); the stream carries `protocol`.
    metrics: `(history) -> dict`, the headline metrics on the experiences finished so far (pure; cl/engine/kind_metrics.py).
    summary: `(result) -> str`, the run's closing line from a result.json mapping (also for reloaded results).
    score: `(history, i) -> str`, the console line after experience i.
    matrix_labels: `(result) -> (row labels, column labels)` of the accuracy-matrix table; None: e0, e1, ...
    """

    name: str
    build: Callable[..., Any] | str
    protocol: EvalProtocol
    metrics: Callable[[Any], dict] | str
    summary: Callable[[Mapping[str, Any]], str] | str
    score: Callable[[Any, int], str] | str
    matrix_labels: Callable[[Mapping[str, Any]], tuple[list[str], list[str]]] | str | None = None
    doc: str = field(default="", compare=False)

    def build_stream(self, cfg: Mapping[str, Any], data_root=None):
        return _resolve(self.build)(cfg, data_root)

    def compute_metrics(self, history) -> dict:
        return dict(_resolve(self.metrics)(history))

    def summary_line(self, result: Mapping[str, Any]) -> str:
        return _resolve(self.summary)(result)

    def score_line(self, history, i: int) -> str:
        return _resolve(self.score)(history, i)

    def labels(self, result: Mapping[str, Any]) -> tuple[list[str] | None, list[str] | None]:
        if self.matrix_labels is None:
            return None, None
        return _resolve(self.matrix_labels)(result)

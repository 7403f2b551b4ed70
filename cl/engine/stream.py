"""Stream records: a continual-learning stream is a plain, sliceable sequence of experiences.

Kept in the engine (not in `scenarios/`) so that the trainer, strategies and interop code can all read
them without importing any scenario builder. Labels are always *global* class ids; the mapping from a
dataset's own labels to the stream's class order is explicit in `StreamInfo.class_order`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence, overload

from torch.utils.data import ConcatDataset, Dataset

from cl.engine.kinds import DEFAULT_PROTOCOL, EvalProtocol

KINDS = ("class_il", "domain_il", "task_il", "fscil", "tta", "forgetting", "text", "union_label")


@dataclass
class Experience:
    """One step of a stream. `train`/`test` yield `(x, y)` with `y` a global class id."""

    index: int
    train: Dataset
    test: Dataset
    classes: list[int]
    kind: str
    task_id: int = 0
    domain: Any = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown experience kind {self.kind!r}; expected one of {KINDS}")


@dataclass
class StreamInfo:
    """What a strategy may know about the stream before it starts (never the data itself)."""

    name: str
    kind: str
    n_classes: int
    n_experiences: int
    class_order: list[int]
    class_names: list[str] | None = None
    input_shape: tuple[int, ...] = (3, 32, 32)
    # For each experience: its global class ids (known up front, as in every reference framework).
    classes_per_experience: list[list[int]] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "n_classes": self.n_classes,
            "n_experiences": self.n_experiences,
            "class_order": list(self.class_order),
            "class_names": self.class_names,
            "input_shape": list(self.input_shape),
            "classes_per_experience": [list(c) for c in self.classes_per_experience],
            "extra": self.extra,
        }


class Stream(Sequence[Experience]):
    """A sequence of experiences; `stream[:t + 1]` is everything seen up to experience t.

    `protocol` says how the trainer runs and scores it (cl/engine/kinds.py); the kind's builder sets it (default: train
    by SGD, evaluate the experiences seen so far)."""

    def __init__(self, experiences: Sequence[Experience], info: StreamInfo, protocol: EvalProtocol | None = None):
        self.experiences = list(experiences)
        self.info = info
        self.protocol = protocol if protocol is not None else DEFAULT_PROTOCOL

    def __len__(self) -> int:
        return len(self.experiences)

    @overload
    def __getitem__(self, i: int) -> Experience: ...
    @overload
    def __getitem__(self, i: slice) -> "Stream": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Stream(self.experiences[i], self.info, self.protocol)
        return self.experiences[i]

    def __iter__(self) -> Iterator[Experience]:
        return iter(self.experiences)

    @property
    def kind(self) -> str:
        return self.info.kind

    def classes(self) -> list[int]:
        """Global ids of every class in these experiences, in order of first appearance."""
        seen: dict[int, None] = {}
        for exp in self.experiences:
            for c in exp.classes:
                seen.setdefault(int(c), None)
        return list(seen)

    def train_union(self) -> Dataset:
        return ConcatDataset([e.train for e in self.experiences])

    def test_union(self) -> Dataset:
        return ConcatDataset([e.test for e in self.experiences])


def eval_view(dataset: Dataset) -> Dataset:
    """The same samples with the evaluation transform (e.g. SimpleCIL's prototypes use test-time crops).

    Datasets that augment in training expose `eval_view()`; the rest are returned as they are.
    """
    if isinstance(dataset, ConcatDataset):
        return ConcatDataset([eval_view(d) for d in dataset.datasets])
    view = getattr(dataset, "eval_view", None)
    return view() if callable(view) else dataset

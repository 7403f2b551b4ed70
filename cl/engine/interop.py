"""clbench streams <-> Avalanche benchmarks, in both directions (optional extra `avalanche`).

    to_avalanche(stream)                 -> an Avalanche CLScenario: `train_stream[i]` / `test_stream[i]` hold
                                            experience i's samples with their global labels (and task labels
                                            on task-IL streams), so Avalanche users can run clbench's scenarios
    from_avalanche(benchmark, name, kind) -> a clbench Stream over an Avalanche benchmark's experiences (what
                                            `scenario=avalanche/<benchmark>` builds, scenarios/datasets/avalanche_benchmarks.py)

Both keep every sample, its label and its experience: `from_avalanche(to_avalanche(s), ...)` has the same
experiences as `s` (tests/test_avalanche_interop.py). Avalanche is imported inside the functions only.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.engine.data import to_model_input
from cl.engine.errors import ConfigError, MissingExtraError
from cl.engine.stream import Experience, Stream, StreamInfo


def require_avalanche() -> None:
    try:
        import avalanche.benchmarks  # noqa: F401
    except ImportError as e:  # pragma: no cover - the extra is installed in CI
        raise MissingExtraError(f"Avalanche interop needs avalanche-lib ({e}): pip install -e .[avalanche]") from e


# --- clbench -> Avalanche --------------------------------------------------------------------------
class ModelInputDataset(Dataset):
    """A clbench dataset's samples as the model sees them: float in [0, 1], resized, with the backbone's channels.

    Avalanche batches samples itself, so the conversion the trainer does per batch is done per sample here."""

    def __init__(self, dataset: Dataset, size: int, channels: int):
        self.dataset, self.size, self.channels = dataset, size, channels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return to_model_input(torch.as_tensor(x)[None], self.size, self.channels, torch.device("cpu"))[0], int(y)


def dataset_targets(dataset: Dataset) -> list[int]:
    targets = getattr(dataset, "targets", None)
    if targets is None:
        targets = [int(dataset[i][1]) for i in range(len(dataset))]
    return [int(t) for t in targets]


def avalanche_dataset(dataset: Dataset, task_label: int, size: int | None = None, channels: int | None = None):
    """An Avalanche classification dataset over `dataset` (targets and task labels as data attributes); with
    `size`/`channels`, samples are converted to the model's input first."""
    require_avalanche()
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset

    source = ModelInputDataset(dataset, size, channels) if size is not None else dataset
    return _make_taskaware_classification_dataset(source, targets=dataset_targets(dataset), task_labels=task_label)


def describe_benchmark(benchmark, classes_per_experience: Sequence[Sequence[int]]):
    """Adds the fields of Avalanche's `nc_benchmark` that its strategies read (iCaRL reads the class order)."""
    benchmark.n_classes_per_exp = [len(c) for c in classes_per_experience]
    benchmark.classes_order = [int(c) for cs in classes_per_experience for c in cs]
    benchmark.n_classes = len(set(benchmark.classes_order))
    return benchmark


def to_avalanche(stream: Stream, *, size: int | None = None, channels: int | None = None):
    """An Avalanche benchmark with one train and one test experience per clbench experience.

    Labels stay global class ids; task labels are the experience's `task_id` on task-IL streams and 0 otherwise
    (Avalanche's convention for class- and domain-incremental benchmarks)."""
    require_avalanche()
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    tasks = [e.task_id if stream.protocol.task_ids else 0 for e in stream]
    bench = benchmark_from_datasets(
        train=[avalanche_dataset(e.train, t, size, channels) for e, t in zip(stream, tasks)],
        test=[avalanche_dataset(e.test, t, size, channels) for e, t in zip(stream, tasks)],
    )
    bench = describe_benchmark(with_task_labels(with_classes_timeline(bench)), stream.info.classes_per_experience)
    bench.clbench_info = stream.info.to_dict()  # provenance: which clbench stream this is
    return bench


# --- Avalanche -> clbench --------------------------------------------------------------------------
def image_tensor(x: Any) -> torch.Tensor:
    """The transform handed to Avalanche's generators: PIL images -> uint8 `[C, H, W]`; tensors pass through
    (clbench resizes and normalises per batch, for the backbone in use)."""
    if isinstance(x, torch.Tensor):
        return x
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(x)


class AvalancheSplit(Dataset):
    """One Avalanche experience's dataset as a clbench dataset: `(x, global label)` plus `targets`."""

    def __init__(self, dataset, indices: np.ndarray | None = None, class_names: list[str] | None = None):
        self.dataset = dataset
        targets = _targets(dataset)
        self.indices = np.arange(len(targets)) if indices is None else np.asarray(indices, dtype=np.int64)
        self.targets = targets[self.indices]
        self.class_names = class_names

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        item = self.dataset[int(self.indices[i])]
        return item[0], int(item[1])


def _targets(dataset) -> np.ndarray:
    return np.asarray(list(dataset.targets), dtype=np.int64)


def _first_per_class(targets: np.ndarray, limit: int | None) -> np.ndarray:
    """Positions of the first `limit` samples of every class (all when None), in dataset order."""
    if limit is None:
        return np.arange(len(targets))
    keep = [np.flatnonzero(targets == c)[:limit] for c in np.unique(targets)]
    return np.sort(np.concatenate(keep)) if keep else np.arange(0)


def from_avalanche(benchmark, *, name: str, kind: str, n_classes: int | None = None,
                   class_names: list[str] | None = None, limit_per_class: int | None = None,
                   extra: dict | None = None) -> Stream:
    """A clbench Stream with experience i = (train_stream[i], test_stream[i]) of `benchmark`.

    `kind` is what the benchmark is: class_il (new classes per experience), task_il (the same with task ids), or
    domain_il (new instances of the same classes). Benchmarks whose test stream is not one experience per
    training experience (CORe50's NI, whose single test set is sessions never trained on) are refused: clbench
    scores each experience on its own test set."""
    train_stream, test_stream = list(benchmark.train_stream), list(benchmark.test_stream)
    whole_test = len(test_stream) == 1 and len(train_stream) > 1  # CORe50's "complete test set only"
    if len(train_stream) != len(test_stream) and not (whole_test and kind != "domain_il"):
        raise ConfigError(f"{name}: Avalanche's test stream has {len(test_stream)} experience(s) for "
                          f"{len(train_stream)} training experiences; clbench needs one test set per experience "
                          f"(pick a benchmark or protocol with per-experience test sets)")
    # Avalanche's nc_benchmark records its class order; a class's rank there orders each experience's classes
    known = [int(c) for c in getattr(benchmark, "classes_order", None) or []]
    rank = {c: r for r, c in enumerate(known)}
    experiences, per_exp = [], []
    for i, tr in enumerate(train_stream):
        te = test_stream[0 if whole_test else i]
        train = AvalancheSplit(tr.dataset, _first_per_class(_targets(tr.dataset), limit_per_class), class_names)
        classes = sorted((int(c) for c in np.unique(train.targets)), key=lambda c: (rank.get(c, len(rank)), c))
        test_targets = _targets(te.dataset)
        # one test set for all: experience i is scored on its own classes' test samples, as nc_benchmark splits
        keep = np.flatnonzero(np.isin(test_targets, classes)) if whole_test else np.arange(len(test_targets))
        test = AvalancheSplit(te.dataset, keep[_first_per_class(test_targets[keep], limit_per_class)], class_names)
        # task ids as clbench's own builders set them: the experience index, except for domain-IL (one task)
        experiences.append(Experience(index=i, train=train, test=test, classes=classes, kind=kind,
                                      task_id=0 if kind == "domain_il" else i,
                                      domain=i if kind == "domain_il" else None))
        per_exp.append(classes)
    all_labels = np.concatenate([e.train.targets for e in experiences] + [e.test.targets for e in experiences])
    n = n_classes or (len(class_names) if class_names else int(all_labels.max()) + 1)
    if kind == "domain_il":
        order = list(range(n))
    else:
        order = [c for cs in per_exp for c in cs]
        order += [c for c in range(n) if c not in order]
    x0 = experiences[0].train[0][0]
    info = StreamInfo(
        name=name, kind=kind, n_classes=n, n_experiences=len(experiences), class_order=order,
        class_names=class_names, input_shape=tuple(torch.as_tensor(x0).shape),
        classes_per_experience=[list(range(n)) if kind == "domain_il" else c for c in per_exp],
        extra={"source": "avalanche", "limit_per_class": limit_per_class, **(extra or {}),
               "n_train": [len(e.train) for e in experiences], "n_test": [len(e.test) for e in experiences]},
    )
    return Stream(experiences, info)

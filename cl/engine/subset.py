"""A view of some samples that still honours the dataset contract (`targets`, `eval_view()`)."""
from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset, Subset

from cl.engine.stream import eval_view
from cl.engine.in_memory import input_shape_of


class TargetSubset(Subset):
    """`torch.utils.data.Subset` that also exposes `targets`, `class_names`, `domains` and `eval_view()`.

    A subset of a subset points straight at the base dataset, so views never nest.
    """

    def __init__(self, dataset: Dataset, indices):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if isinstance(dataset, TargetSubset):
            indices, dataset = dataset.indices[indices], dataset.dataset
        super().__init__(dataset, indices)
        self.targets = np.asarray(dataset.targets, dtype=np.int64)[indices]

    def __getitem__(self, i):
        return self.dataset[int(self.indices[i])]

    def __getitems__(self, indices: list[int]) -> list:
        return [self.dataset[int(self.indices[i])] for i in indices]

    @property
    def class_names(self) -> list[str] | None:
        return getattr(self.dataset, "class_names", None)

    @property
    def domains(self) -> np.ndarray | None:
        domains = getattr(self.dataset, "domains", None)
        return None if domains is None else np.asarray(domains)[self.indices]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return input_shape_of(self.dataset)

    def eval_view(self) -> "TargetSubset":
        return TargetSubset(eval_view(self.dataset), self.indices)

"""X-TAIL metrics over a T x T accuracy matrix A (row i: after learning dataset i; column j: dataset j).

Why their own functions: union-label streams report how a method keeps CLIP's zero-shot ability on datasets it
has not learned yet (Transfer), besides the usual last row. Definitions from the X-TAIL / MoRAM evaluation:
Transfer = mean of the strict upper triangle, Average = mean of the whole matrix, Last = mean of the final row.
"""
from __future__ import annotations

import numpy as np


def _matrix(acc) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {a.shape}")
    return a


def transfer(acc) -> float:
    """Mean accuracy on datasets not yet learned (strict upper triangle); nan for a single dataset."""
    a = _matrix(acc)
    iu = np.triu_indices(a.shape[0], k=1)
    return float(a[iu].mean()) if iu[0].size else float("nan")


def average(acc) -> float:
    """Mean of the whole matrix."""
    return float(_matrix(acc).mean())


def last(acc) -> float:
    """Mean of the final row."""
    return float(_matrix(acc)[-1].mean())


def xtail_summary(acc) -> dict:
    return {"transfer": transfer(acc), "average": average(acc), "last": last(acc)}


def from_history(history) -> dict:
    """KIND_METRICS entry for `union_label`: X-TAIL metrics on the experiences finished so far (percent).

    Transfer needs the future columns, so synthetic-xtail turns `trainer.eval_future` on; without it the upper
    triangle is NaN and so is Transfer."""
    k = len(history.acc_matrix)
    rows = [[float("nan") if v is None else float(v) for v in row[:k]] for row in history.acc_matrix]
    a = _matrix(rows)
    iu = np.triu_indices(k, k=1)
    return {"transfer": float(np.nanmean(a[iu])) if iu[0].size and not np.isnan(a[iu]).all() else float("nan"),
            "average": float(np.nanmean(a)), "last": last(a), "acc_per_experience": list(a[-1])}

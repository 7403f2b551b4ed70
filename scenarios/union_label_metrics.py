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

"""X-TAIL metrics over a T x T accuracy matrix A (row i: after learning dataset i; column j: dataset j).

Why their own functions: union-label streams report how a method keeps CLIP's zero-shot ability on datasets it
has not learned yet (Transfer), besides the usual last row. Definitions of the X-TAIL / MoRAM evaluation
(Artificer-AI-Lab/MoRAM `XTAIL/main.py:189-195`):
- Transfer: for each column j >= 1, the mean of A[i, j] over the rows i < j (the models that had not learned
  dataset j yet), then the mean over those columns, so each not-yet-learned dataset counts once whatever its
  position (`np.mean(np.ma.masked_equal(np.triu(A, 1), 0), axis=0)`, then `np.mean`). An earlier version took the
  flat mean of the strict upper triangle, which weights late datasets by their number of rows (4x4 example in
  tests/test_union_label.py: 74.00 flat, 70.50 X-TAIL).
- Exact-zero cells: the reference masks every 0 of the upper triangle (its way of dropping the lower triangle,
  which also drops a genuine 0% zero-shot accuracy); `mask_zeros=True`, the default, does the same, so a published
  Transfer and ours agree. NaN cells (not evaluated: `trainer.eval_future` off) are always skipped. A column with
  no cell left does not count.
- Average: the mean of the whole matrix (`np.mean(np.mean(A, 0))`, the same for a full matrix).
- Last: the mean of the final row.
"""
from __future__ import annotations

import numpy as np


def _matrix(acc) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {a.shape}")
    return a


def transfer(acc, mask_zeros: bool = True) -> float:
    """X-TAIL Transfer: mean over columns j >= 1 of the mean of A[:j, j] (see the module docstring); exact zeros
    are skipped with `mask_zeros` (the reference), NaN cells always; nan when no cell is left."""
    a = _matrix(acc)
    cols = []
    for j in range(1, a.shape[0]):
        v = a[:j, j]
        keep = ~np.isnan(v) & ((v != 0) if mask_zeros else True)
        if keep.any():
            cols.append(float(v[keep].mean()))
    return float(np.mean(cols)) if cols else float("nan")


def average(acc) -> float:
    """Mean of the whole matrix."""
    return float(_matrix(acc).mean())


def last(acc) -> float:
    """Mean of the final row."""
    return float(_matrix(acc)[-1].mean())


def xtail_summary(acc, mask_zeros: bool = True) -> dict:
    return {"transfer": transfer(acc, mask_zeros), "average": average(acc), "last": last(acc)}


def from_history(history) -> dict:
    """KIND_METRICS entry for `union_label`: X-TAIL metrics on the experiences finished so far (percent).

    Transfer needs the future columns, so synthetic-xtail turns `trainer.eval_future` on; without it the upper
    triangle is NaN and so is Transfer."""
    k = len(history.acc_matrix)
    rows = [[float("nan") if v is None else float(v) for v in row[:k]] for row in history.acc_matrix]
    a = _matrix(rows)
    return {"transfer": transfer(a), "average": float(np.nanmean(a)), "last": last(a), "acc_per_experience": list(a[-1])}

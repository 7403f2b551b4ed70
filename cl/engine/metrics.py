"""Continual-learning metrics over an accuracy matrix (pure functions, numpy in, floats out).

Functional style as in Avalanche: every metric is computed from the finished matrix, so the trainer only
has to record it and any metric can be recomputed later from a saved run.

Conventions:
- `R` is a T x T matrix of accuracies in percent: `R[i, j]` = accuracy on experience j's test data after
  training on experience i. Entries with j > i (future experiences) may be NaN; every entry on or below
  the diagonal must be finite.
- `counts[j]` is the number of test samples of experience j (positive).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _matrix(R) -> np.ndarray:
    """Check that R is square with a finite lower triangle; the upper triangle may hold NaN (not evaluated)."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {R.shape}")
    if not np.all(np.isfinite(R[np.tril_indices(R.shape[0])])):
        raise ValueError("accuracy matrix has NaN/inf on or below the diagonal (R[i, j] with j <= i)")
    return R


def _counts(counts, T: int) -> np.ndarray:
    """Check that there is one positive test-set size per experience."""
    c = np.asarray(counts, dtype=float)
    if c.shape != (T,):
        raise ValueError(f"counts must have length T={T} (one test-set size per experience), got shape {c.shape}")
    if np.any(c <= 0):
        raise ValueError(f"counts must all be positive, got {list(counts)}")
    return c


def stage_accuracies(R, counts) -> np.ndarray:
    """Accuracy over all test samples seen so far after each stage, A_b (PILOT/PyCIL top-1 on seen classes).

    Sample-weighted, not a mean over experiences: a large experience weighs more, as when all seen test
    images are pooled into one test set.
    """
    R = _matrix(R)
    c = _counts(counts, R.shape[0])
    lower = np.tril(np.nan_to_num(R, nan=0.0))  # zero the unseen (j > b) entries
    return (lower @ c) / np.cumsum(c)


def average_incremental_accuracy(R, counts) -> float:
    """Mean of A_b over all stages, stage 1 included: rewards being accurate all along, not only at the end."""
    return float(np.mean(stage_accuracies(R, counts)))


def last_accuracy(R, counts) -> float:
    """A_T: accuracy over all test samples after the final stage."""
    return float(stage_accuracies(R, counts)[-1])


def forgetting(R) -> float:
    """Mean drop from each old experience's best accuracy to its final accuracy (PILOT definition).

    The best is taken over all rows from the experience's own stage to the last, so a task that improved
    later and then fell is measured from its peak; the last row is in the max, so it is never negative.
    """
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    drops = [R[j:, j].max() - R[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def backward_transfer(R) -> float:
    """Signed mean change on old experiences from just after learning them to the end (Lopez-Paz & Ranzato).

    Negative means forgetting, positive means later training helped old experiences.
    """
    R = _matrix(R)
    T = R.shape[0]
    if T == 1:
        return 0.0
    return float(np.mean(R[T - 1, : T - 1] - np.diag(R)[: T - 1]))


def forward_transfer(R, baseline: Sequence[float]) -> float:
    """Mean gain on each next experience before training on it, over an untrained model (Lopez-Paz & Ranzato).

    `baseline[j]` is the accuracy on experience j of the model before any training (baseline[0] is unused).
    Needs the first superdiagonal R[j-1, j], so future experiences must have been evaluated.
    """
    R = _matrix(R)
    T = R.shape[0]
    b = np.asarray(baseline, dtype=float)
    if b.shape != (T,):
        raise ValueError(f"baseline must have length T={T}, got shape {b.shape}")
    if T == 1:
        return 0.0
    ahead = np.array([R[j - 1, j] for j in range(1, T)])
    if not np.all(np.isfinite(ahead)):
        raise ValueError("forward transfer needs R[j-1, j] for every j >= 1; evaluate future experiences too")
    if not np.all(np.isfinite(b[1:])):
        raise ValueError("forward transfer needs a finite baseline[j] for every j >= 1")
    return float(np.mean(ahead - b[1:]))


def accuracy_matrix_from_counts(correct, counts) -> np.ndarray:
    """Percent matrix from integer correct counts: correct[i][j] / counts[j] * 100 (NaN stays NaN)."""
    C = np.asarray(correct, dtype=float)
    if C.ndim != 2 or C.shape[0] != C.shape[1] or C.shape[0] == 0:
        raise ValueError(f"correct-count matrix must be square T x T with T >= 1, got shape {C.shape}")
    c = _counts(counts, C.shape[0])
    return C / c[None, :] * 100.0


def harmonic_mean(a: float, b: float) -> float:
    """2ab/(a+b): high only when both are high (e.g. retained vs forgotten accuracy); 0 when a + b == 0."""
    a, b = float(a), float(b)
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def summarize(R, counts, baseline: Sequence[float] | None = None) -> dict:
    """All matrix metrics as plain floats, ready for JSON; "fwt" only when it can be computed."""
    R = _matrix(R)
    stage = stage_accuracies(R, counts)
    out = {
        "avg_incremental_acc": float(np.mean(stage)),
        "last_acc": float(stage[-1]),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
        "stage_acc": [float(a) for a in stage],
    }
    T = R.shape[0]
    if baseline is not None and all(np.isfinite(R[j - 1, j]) for j in range(1, T)):
        out["fwt"] = forward_transfer(R, baseline)
    return out

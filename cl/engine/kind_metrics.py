"""Each scenario kind's headline metrics and console lines, as pure functions of a run's history or result.

Why here and not in `scenarios/`: they are computed from the matrices every run stores, so the engine, the
leaderboard and a reloaded result can recompute them without any scenario builder; the kinds register them
(`scenarios.KINDS`, `cl.engine.kinds.Kind`). `history` is anything with the fields of `cl.engine.trainer.History`
(`acc_matrix`, `task_il_matrix`, `test_counts`, `initial_accuracy`, `initial_task_il_accuracy`, `costs`);
`result` is a result.json mapping.

Families:
- incremental (class_il, task_il, fscil, text): `cl.engine.metrics.summarize` on the class-IL and task-IL matrices, and
  forward transfer on the task-IL matrix; domain_il adds class-IL forward transfer (`fwt`).
- tta: online error per experience and per named domain, `mean_error`, per-batch costs.
- forgetting (GS-LoRA): accuracy on retained and forgotten classes, Drop and H.
- union_label (X-TAIL): Transfer, Average, Last.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from cl.engine import metrics
from cl.engine.errors import ConfigError


def square(matrix: list[list[float | None]]) -> list[list[float]]:
    """The first k columns of a k-row matrix, None (not evaluated) as NaN."""
    k = len(matrix)
    return [[v if v is not None else float("nan") for v in row[:k]] for row in matrix]


def _wall(result: Mapping[str, Any]) -> str:
    return f"wall {result['costs']['total_wall_s']:.1f}s"


# --- incremental kinds ----------------------------------------------------------------------------------------
def incremental(history, class_il_fwt: bool = False) -> dict:
    """The headline metrics on the experiences finished so far (percent).

    Forward transfer needs `eval_future`. It is computed on the task-IL matrix for every incremental kind
    (`fwt_task_il`), and on the class-IL matrix only with `class_il_fwt` (domain-IL): in class-IL a future
    experience's classes are masked until they are seen, so its class-IL accuracy is 0 by construction.
    """
    k = len(history.acc_matrix)
    counts = history.test_counts[:k]
    out = metrics.summarize(square(history.acc_matrix), counts)
    task = metrics.summarize(square(history.task_il_matrix), counts)
    out["task_il"] = {key: task[key] for key in ("avg_incremental_acc", "last_acc", "forgetting", "bwt")}
    complete = history.initial_accuracy is not None and all(v is not None for v in history.acc_matrix[0])
    if complete and k == len(history.acc_matrix[0]):
        out["fwt_task_il"] = metrics.forward_transfer(history.task_il_matrix, history.initial_task_il_accuracy)
        if class_il_fwt:
            out["fwt"] = metrics.forward_transfer(history.acc_matrix, history.initial_accuracy)
    return out


def domain_incremental(history) -> dict:
    """`incremental`, plus class-IL forward transfer: every domain has all classes, so it is defined."""
    return incremental(history, class_il_fwt=True)


def incremental_summary(result: Mapping[str, Any]) -> str:
    m = result["metrics"]
    return (f"avg incremental acc {m['avg_incremental_acc']:.2f}  last acc {m['last_acc']:.2f}  "
            f"forgetting {m['forgetting']:.2f}  bwt {m['bwt']:.2f}  "
            f"(task-IL last {m['task_il']['last_acc']:.2f})  {_wall(result)}")


def seen_score(history, i: int) -> str:
    """Accuracy over the test data of every experience seen so far (sample-weighted, A_b)."""
    seen = metrics.stage_accuracies(square(history.acc_matrix), history.test_counts[: len(history.acc_matrix)])
    return f"accuracy on seen data {seen[-1]:.2f}%"


# --- tta: continual test-time adaptation --------------------------------------------------------------------
def tta(history) -> dict:
    """Online error per named domain and its mean (the tables' "mean error"), plus per-batch costs.

    Domains that occur several times (gradual schedules) are averaged by sample count."""
    k = len(history.acc_matrix)
    online = [history.acc_matrix[i][i] for i in range(k)]
    errors = [100 - a for a in online]
    costs = history.costs[:k]
    names = [c.get("domain", f"experience_{i}") for i, c in enumerate(costs)]
    counts = history.test_counts[:k] if len(history.test_counts) >= k else [1] * k
    per_domain: dict[str, list[float]] = {}
    for name, err, n in zip(names, errors, counts):
        tot = per_domain.setdefault(name, [0.0, 0])
        tot[0] += err * n
        tot[1] += n
    out = {"online_acc_per_experience": online, "error_per_experience": errors,
           "error_per_domain": {n: e / max(c, 1) for n, (e, c) in per_domain.items()},
           "mean_error": sum(errors) / k}
    orders = [c.get("order") for c in costs]
    if len(costs) == k and None not in orders and len(set(orders)) > 1:  # several orders: the mean of each
        out["mean_error_per_order"] = [sum(e for e, o in zip(errors, orders) if o == j) / orders.count(j)
                                       for j in sorted(set(orders))]

    def mean(key):
        vals = [c[key] for c in costs if c.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    out["cost_per_batch"] = {"time_s": mean("time_per_batch_s"), "forward_passes": mean("forward_passes_per_batch"),
                             "saved_for_backward_mb": max((c.get("saved_for_backward_mb") or 0 for c in costs), default=None),
                             "resident_state_mb": mean("resident_state_mb"),
                             "peak_memory_mb": max((c.get("peak_memory_mb") or 0 for c in costs), default=None),
                             "peak_memory_kind": costs[-1].get("peak_memory_kind") if costs else None}
    return out


def tta_summary(result: Mapping[str, Any]) -> str:
    return f"mean online error {result['metrics']['mean_error']:.2f}  {_wall(result)}"


def tta_score(history, i: int) -> str:
    return f"online accuracy {history.acc_matrix[-1][i]:.2f}%"


def domain_labels(result: Mapping[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """Rows and columns named by the stream's domains (corruption_severity), when it recorded them."""
    domains = ((result.get("stream") or {}).get("extra") or {}).get("domains")
    if not domains:
        return None, None
    names = [str(d) for d in domains]
    return names[: len(result["acc_matrix"])], names


# --- forgetting: continual forgetting (GS-LoRA) -------------------------------------------------------------
def forget_drop(acc_forget_before: float, acc_forget_after: float) -> float:
    """Drop = Acc_f(before) - Acc_f(after): how much accuracy the forget request removed."""
    return float(acc_forget_before) - float(acc_forget_after)


def h_mean(acc_retain: float, drop: float) -> float:
    """The paper's H = 2 * Drop * Acc_r / (Drop + Acc_r); 0 when both are 0 (or Drop <= 0: nothing forgotten)."""
    acc_retain, drop = float(acc_retain), float(drop)
    if drop <= 0.0 or acc_retain <= 0.0:
        return 0.0
    return 2.0 * drop * acc_retain / (drop + acc_retain)


def forgetting_summary(acc_original: float, per_request: list[dict]) -> dict:
    """Headline metrics after the last request.

    `per_request`: one dict per request with `acc_retain`, `acc_forget` (all classes forgotten so far),
    `acc_forget_current` (this request's classes now) and `acc_forget_before` (the original model on this
    request's classes), in percent. Drop and H use this request's classes, as the paper's tables do.
    """
    if not per_request:
        raise ConfigError("forgetting metrics need at least one forget request; give the scenario n_requests >= 1")
    rows = []
    for r in per_request:
        current = r.get("acc_forget_current", r["acc_forget"])
        drop = forget_drop(r["acc_forget_before"], current)
        rows.append({**r, "drop": drop, "h_mean": h_mean(r["acc_retain"], drop)})
    last = rows[-1]
    return {"acc_original": float(acc_original), "acc_retain": float(last["acc_retain"]),
            "acc_forget": float(last["acc_forget"]), "h_mean": last["h_mean"], "per_request": rows}


def _weighted(acc: list, counts: list[int], groups) -> float:
    groups = list(groups)
    n = sum(counts[g] for g in groups)
    if n == 0:
        return float("nan")
    return float(sum(float(acc[g]) * counts[g] for g in groups) / n)


def forgetting(history) -> dict:
    """The forgetting metrics on the requests finished so far (scenarios/kinds/forgetting.py's docstring).

    Columns of `acc_matrix`: group j < T is request j's classes, the last column the never-forgotten classes.
    `initial_accuracy` is the original model on every group (the protocol's `eval_initial` pass)."""
    rows, counts, before = history.acc_matrix, list(history.test_counts), history.initial_accuracy
    if before is None:
        raise ConfigError("forgetting metrics need the original model's accuracy: the stream must set eval_initial")
    n_groups = len(counts)
    acc_original = _weighted(before, counts, range(n_groups))
    per_request = []
    for i, row in enumerate(rows):
        forgotten, kept = range(0, i + 1), range(i + 1, n_groups)
        start = before if i == 0 else rows[i - 1]  # the model at the start of request i (reference :920)
        per_request.append({
            "request": i,
            "acc_retain": _weighted(row, counts, kept),
            "acc_forget": _weighted(row, counts, forgotten),
            "acc_forget_current": float(row[i]),
            "acc_old": _weighted(row, counts, range(0, i)) if i else None,
            "acc_forget_before": float(start[i]),
            "acc_retain_before": _weighted(start, counts, kept),
            "acc_forget_original": float(before[i]),
        })
    return forgetting_summary(acc_original, per_request)


def forgetting_result_summary(result: Mapping[str, Any]) -> str:
    m = result["metrics"]
    return (f"original acc {m['acc_original']:.2f}  retained acc {m['acc_retain']:.2f}  forgotten acc "
            f"{m['acc_forget']:.2f}  H {m['h_mean']:.2f}  {_wall(result)}")


def forgetting_score(history, i: int) -> str:
    m = forgetting(history)
    return f"retained {m['acc_retain']:.2f}%  forgotten {m['acc_forget']:.2f}%  H {m['h_mean']:.2f}"


def forgetting_labels(result: Mapping[str, Any]) -> tuple[list[str] | None, list[str] | None]:
    """One row per request, one column per class group (request_t, ..., retained)."""
    groups = ((result.get("stream") or {}).get("extra") or {}).get("eval_groups")
    rows = [f"request_{t}" for t in range(len(result["acc_matrix"]))]
    return rows, ([str(g) for g in groups] if groups else None)


# --- union_label: X-TAIL ----------------------------------------------------------------------------------------
# Over a T x T accuracy matrix A (row i: after learning dataset i; column j: dataset j). Why their own functions:
# union-label streams report how a method keeps CLIP's zero-shot ability on datasets it has not learned yet
# (Transfer), besides the usual last row. Definitions of the X-TAIL / MoRAM evaluation
# (Artificer-AI-Lab/MoRAM `XTAIL/main.py:189-195`):
# - Transfer: for each column j >= 1, the mean of A[i, j] over the rows i < j (the models that had not learned
#   dataset j yet), then the mean over those columns, so each not-yet-learned dataset counts once whatever its
#   position (`np.mean(np.ma.masked_equal(np.triu(A, 1), 0), axis=0)`, then `np.mean`). An earlier version took the
#   flat mean of the strict upper triangle, which weights late datasets by their number of rows (4x4 example in
#   tests/test_union_label.py: 74.00 flat, 70.50 X-TAIL).
# - Exact-zero cells: the reference masks every 0 of the upper triangle (its way of dropping the lower triangle,
#   which also drops a genuine 0% zero-shot accuracy); `mask_zeros=True`, the default, does the same, so a published
#   Transfer and ours agree. NaN cells (not evaluated: `trainer.eval_future` off) are always skipped. A column with
#   no cell left does not count.
# - Average: the mean of the whole matrix (`np.mean(np.mean(A, 0))`, the same for a full matrix).
# - Last: the mean of the final row.
def _xtail_matrix(acc) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {a.shape}")
    return a


def transfer(acc, mask_zeros: bool = True) -> float:
    """X-TAIL Transfer: mean over columns j >= 1 of the mean of A[:j, j] (see above); exact zeros are skipped
    with `mask_zeros` (the reference), NaN cells always; nan when no cell is left."""
    a = _xtail_matrix(acc)
    cols = []
    for j in range(1, a.shape[0]):
        v = a[:j, j]
        keep = ~np.isnan(v) & ((v != 0) if mask_zeros else True)
        if keep.any():
            cols.append(float(v[keep].mean()))
    return float(np.mean(cols)) if cols else float("nan")


def average(acc) -> float:
    """Mean of the whole matrix."""
    return float(_xtail_matrix(acc).mean())


def last(acc) -> float:
    """Mean of the final row."""
    return float(_xtail_matrix(acc)[-1].mean())


def xtail_summary(acc, mask_zeros: bool = True) -> dict:
    return {"transfer": transfer(acc, mask_zeros), "average": average(acc), "last": last(acc)}


def union_label(history) -> dict:
    """X-TAIL metrics on the experiences finished so far (percent).

    Transfer needs the future columns, so synthetic-xtail turns `trainer.eval_future` on; without it the upper
    triangle is NaN and so is Transfer."""
    k = len(history.acc_matrix)
    rows = [[float("nan") if v is None else float(v) for v in row[:k]] for row in history.acc_matrix]
    a = _xtail_matrix(rows)
    return {"transfer": transfer(a), "average": float(np.nanmean(a)), "last": last(a), "acc_per_experience": list(a[-1])}


def union_label_summary(result: Mapping[str, Any]) -> str:
    m = result["metrics"]
    return f"transfer {m['transfer']:.2f}  average {m['average']:.2f}  last {m['last']:.2f}  {_wall(result)}"

"""Continual-forgetting metrics (GS-LoRA, CVPR'24 / T-PAMI): pure functions of per-request accuracies.

WHY pure: the `forgetting` scenario kind (builder not yet written, see docs/forgetting_and_sparsity.md) records,
after each forget request, the accuracy on retained classes and on the classes forgotten so far; the headline
numbers are these functions of those records (percent scalars).
"""
from __future__ import annotations

from cl.errors import ConfigError


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

    `per_request`: one dict per request with `acc_retain`, `acc_forget` (accuracy now on all classes forgotten
    so far) and `acc_forget_before` (the original model's accuracy on those same classes), all in percent.
    """
    if not per_request:
        raise ConfigError("forgetting metrics need at least one forget request; give the scenario n_requests >= 1")
    rows = []
    for r in per_request:
        drop = forget_drop(r["acc_forget_before"], r["acc_forget"])
        rows.append({**r, "drop": drop, "h_mean": h_mean(r["acc_retain"], drop)})
    last = rows[-1]
    return {"acc_original": float(acc_original), "acc_retain": float(last["acc_retain"]),
            "acc_forget": float(last["acc_forget"]), "h_mean": last["h_mean"], "per_request": rows}

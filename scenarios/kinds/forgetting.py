"""Scenario kind `forgetting` (continual forgetting, GS-LoRA CVPR'24 / T-PAMI): a pre-trained classifier receives
a sequence of forget requests; each names classes to erase, with the data of the classes it must keep.

The stream (`build_forgetting`, the kind's record `KIND`):
- Classes: the dataset's `n_classes` K. As the reference (`bjzhb666/GS-LoRA` train/train_own_forget_cl.py:198-203,
  538-545), the class ids are first put in a seeded random order, `random.seed(SEED); random.shuffle(order)` with
  Python's `random` (`class_order_seed`, default 1337, the reference's `SEED` in config.py); request t forgets
  `forget_per_request` classes of that order counted down from its end (`NUM_FIRST_CLS`, `PER_FORGET_CLS`): with
  K=100 and 20 per request, request 0 forgets order[80:100], request 1 order[60:80], ...
  `class_order_seed: null` takes the label order instead (request 0 forgets 80-99, ...); `requests: [[...], ...]`
  lists the classes explicitly. Classes forgotten earlier are never replayed.
- Experience t: `classes` = the classes forgotten at t; `train` = a subset of the forget set and of the retained
  set (every class not forgotten so far and not forgotten now): `data_ratio` of each (the reference's random
  subset; 0.1 CASIA, 0.05 ImageNet100) or `few_shot` images per class; `test` = the test images of the classes
  forgotten at t; `meta` holds `forget`, `retain`, `forgotten_before` (class lists) and the validation sets
  `val_forget` / `val_retain` that strategies may report on (the reference evaluates on the test set).
- Validation: per class, the last `val_fraction` of the train split (in dataset order) is held out before any
  subset is drawn; `synthetic-forget`'s original model never trains on it either.
- Evaluation: the stream's protocol names `eval_experiences`, one test group per request plus the classes never
  forgotten (`retained`), which the trainer evaluates after EVERY request (and once before the first:
  `eval_initial`, the original model). So `acc_matrix` has one row per request and one column per class group.

Metrics (`cl.engine.kind_metrics.forgetting`, registered in `KIND`), all percent, sample-weighted over groups:
- `acc_original`: the original model on all classes; per request `acc_retain` (classes not forgotten so far),
  `acc_forget` (all classes forgotten so far), `acc_forget_current` (the paper's Acc_f: this request's classes),
  `acc_old` (the paper's Acc_o: classes forgotten by earlier requests), `drop` = Acc_f(before) - Acc_f(after) on
  this request's classes, and the paper's `h_mean` = 2 * Drop * Acc_r / (Drop + Acc_r) (engine_cl.evaluate).
- "before" is the model at the START of the request, as the reference measures `forget_acc_before`
  (train_own_forget_cl.py:920, after loading the previous request's final model): the original model for request
  0, the previous request's row for the others (the model a request starts from is the one evaluated at the end
  of the previous request: its LoRA is merged and the fresh one is a no-op). `acc_forget_original` keeps the
  original model's accuracy on the request's classes.
"""
from __future__ import annotations

import numpy as np

from cl.engine import kind_metrics as km
from cl.engine.errors import ConfigError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Experience, Stream, StreamInfo

# --- the stream -----------------------------------------------------------------------------------------------


def split_validation(targets: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): per class, the last ceil(fraction * n_c) samples in dataset order
    (at least one when fraction > 0, never all of them). Deterministic, so the original model's cache and the
    stream agree on which images are held out."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"scenario.val_fraction must be in [0, 1), got {fraction}")
    targets = np.asarray(targets)
    fit, val = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = min(len(idx) - 1, int(np.ceil(fraction * len(idx)))) if fraction > 0 else 0
        fit.append(idx[: len(idx) - k])
        val.append(idx[len(idx) - k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def _first_per_class(idx: np.ndarray, targets: np.ndarray, limit: int | None) -> np.ndarray:
    if not limit:
        return idx
    keep = [idx[targets[idx] == c][:limit] for c in np.unique(targets[idx])]
    return np.sort(np.concatenate(keep))


def _of_classes(idx: np.ndarray, targets: np.ndarray, classes) -> np.ndarray:
    return idx[np.isin(targets[idx], list(classes))]


REFERENCE_CLASS_ORDER_SEED = 1337  # bjzhb666/GS-LoRA config.py SEED, which train_own_forget_cl.py:202 shuffles with


def class_order(n_classes: int, seed: int | None) -> list[int]:
    """The order requests take classes from (from its end): `random.seed(seed); random.shuffle(range(K))` as the
    reference (train_own_forget_cl.py:198-203; a private `random.Random(seed)` draws the same permutation without
    touching the global generator), or the label order for `seed=None`."""
    import random

    order = list(range(n_classes))
    if seed is not None:
        random.Random(int(seed)).shuffle(order)
    return order


def forget_requests(n_classes: int, cfg: dict) -> list[list[int]]:
    """The classes of each request: explicit `requests`, else `n_requests` blocks of `forget_per_request` taken
    from the end of `class_order(K, class_order_seed)`, as the reference's split_dataset(order_list, en1, en2)."""
    explicit = cfg.get("requests")
    if explicit:
        reqs = [[int(c) for c in r] for r in explicit]
    else:
        n_req, per = cfg.get("n_requests"), cfg.get("forget_per_request")
        if not isinstance(n_req, int) or not isinstance(per, int) or n_req < 1 or per < 1:
            raise ConfigError("a forgetting scenario needs 'n_requests' and 'forget_per_request' (integers >= 1), "
                              "or 'requests' (a list of class-id lists)")
        if n_req * per >= n_classes:
            raise ConfigError(f"{n_req} requests of {per} classes would forget all {n_classes} classes: keep at "
                              f"least one class (lower scenario.n_requests or scenario.forget_per_request)")
        seed = cfg.get("class_order_seed", REFERENCE_CLASS_ORDER_SEED)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ConfigError(f"scenario.class_order_seed must be an integer or null (label order), got {seed!r}")
        order = class_order(n_classes, seed)
        reqs = [sorted(order[n_classes - (t + 1) * per: n_classes - t * per]) for t in range(n_req)]
    flat = [c for r in reqs for c in r]
    if any(not 0 <= c < n_classes for c in flat) or len(set(flat)) != len(flat) or any(not r for r in reqs):
        raise ConfigError(f"scenario.requests must be non-empty lists of distinct class ids in 0..{n_classes - 1}, "
                          f"no class forgotten twice; got {reqs}")
    if len(flat) >= n_classes:
        raise ConfigError("scenario.requests forget every class: keep at least one class")
    return reqs


def _subset_per_request(idx: np.ndarray, targets: np.ndarray, ratio: float, few_shot: int | None,
                        rng: np.random.Generator) -> np.ndarray:
    """The reference's training subsets: `few_shot` images per class, else a random `ratio` of the set."""
    if few_shot:
        keep = [rng.permutation(idx[targets[idx] == c])[:few_shot] for c in np.unique(targets[idx])]
        return np.sort(np.concatenate(keep))
    if ratio >= 1.0:
        return idx
    n = max(1, int(len(idx) * ratio))
    return np.sort(rng.permutation(idx)[:n])


def build_forgetting(cfg: dict, data_root=None) -> Stream:
    from scenarios import TargetSubset
    from scenarios.datasets.registry import get_loader, resolve_data_root

    dataset = cfg.get("dataset")
    if not isinstance(dataset, str):
        raise ConfigError("a forgetting scenario needs 'dataset' (a registered dataset name, e.g. synthetic)")
    name = cfg.get("name") or f"{dataset}-forget"
    ratio = float(cfg.get("data_ratio", 1.0))
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"scenario.data_ratio must be in (0, 1], got {ratio}")
    few_shot = cfg.get("few_shot")
    if few_shot is not None and (not isinstance(few_shot, int) or few_shot < 1):
        raise ConfigError(f"scenario.few_shot must be null or an integer >= 1 (images per class), got {few_shot}")
    limit = cfg.get("limit_per_class")
    data = get_loader(dataset)({**cfg, "name": name}, resolve_data_root(data_root))
    train_y = np.asarray(data.train.targets, dtype=np.int64)
    test_y = np.asarray(data.test.targets, dtype=np.int64)
    names = getattr(data.train, "class_names", None)
    n_classes = len(names) if names else int(max(train_y.max(), test_y.max())) + 1
    reqs = forget_requests(n_classes, cfg)

    fit_idx, val_idx = split_validation(train_y, float(cfg.get("val_fraction", 0.1)))
    fit_idx = _first_per_class(fit_idx, train_y, limit)
    test_idx = _first_per_class(np.arange(len(test_y)), test_y, limit)
    rng = np.random.default_rng(int(cfg.get("subset_seed", 0)))

    all_classes = list(range(n_classes))
    exps, forgotten = [], []
    for t, forget in enumerate(reqs):
        retain = [c for c in all_classes if c not in forgotten and c not in forget]
        f_idx = _subset_per_request(_of_classes(fit_idx, train_y, forget), train_y, ratio, few_shot, rng)
        r_idx = _subset_per_request(_of_classes(fit_idx, train_y, retain), train_y, ratio, few_shot, rng)
        meta = {"forget": list(forget), "retain": retain, "forgotten_before": list(forgotten),
                "val_forget": TargetSubset(data.train, _of_classes(val_idx, train_y, forget)),
                "val_retain": TargetSubset(data.train, _of_classes(val_idx, train_y, retain))}
        exps.append(Experience(t, TargetSubset(data.train, np.sort(np.concatenate([f_idx, r_idx]))),
                               TargetSubset(data.test, _of_classes(test_idx, test_y, forget)), list(forget),
                               "forgetting", task_id=0, meta=meta))
        forgotten += forget
    never = [c for c in all_classes if c not in forgotten]
    kept = Experience(len(reqs), TargetSubset(data.train, _of_classes(fit_idx, train_y, never)),
                      TargetSubset(data.test, _of_classes(test_idx, test_y, never)), never, "forgetting",
                      meta={"group": "retained"})
    shape = tuple(getattr(data.train, "input_shape", None) or tuple(data.train[0][0].shape))
    info = StreamInfo(name=name, kind="forgetting", n_classes=n_classes, n_experiences=len(exps),
                      class_order=all_classes, class_names=names, input_shape=shape,
                      classes_per_experience=[list(r) for r in reqs],
                      extra={"requests": [list(r) for r in reqs], "never_forgotten": never,
                             "eval_groups": [f"request_{t}" for t in range(len(reqs))] + ["retained"],
                             "class_order_seed": cfg.get("class_order_seed", REFERENCE_CLASS_ORDER_SEED),
                             "data_ratio": ratio, "few_shot": few_shot,
                             "val_fraction": float(cfg.get("val_fraction", 0.1))})
    return Stream(exps, info, KIND.protocol.with_groups([*exps, kept]))


# The original model is evaluated once first; every class group (each request's, then the retained classes) is
# tested after every request: `build_forgetting` names the groups.
KIND = Kind(
    name="forgetting", build=build_forgetting, protocol=EvalProtocol(eval_initial=True),
    metrics=km.forgetting, summary=km.forgetting_result_summary, score=km.forgetting_score,
    matrix_labels=km.forgetting_labels,
)

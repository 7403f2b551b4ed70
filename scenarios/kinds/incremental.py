"""Scenario kinds `class_il`, `task_il` and `domain_il`: streams cut from any registered labelled dataset.

class_il / task_il: blocks of classes in a seeded class order (the PILOT family: seed 1993, `init_cls`,
`increment`); task_il is the same stream scored with task ids (`predict` gets each sample's task, training
batches carry it). domain_il: one experience per domain of a multi-domain dataset, all classes in each.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from cl.engine import kind_metrics as km
from cl.engine.errors import ConfigError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Stream
from scenarios.kinds.builders import class_incremental, domain_incremental
from scenarios.config import as_dict, get_bool, get_int, get_str
from scenarios.datasets.registry import get_loader, resolve_data_root


def build_incremental(cfg: Any, data_root: str | Path | None = None) -> Stream:
    """A class_il, task_il or domain_il stream over `scenario.dataset`."""
    from scenarios import DEFAULT_CLASS_ORDER_SEED

    cfg = as_dict(cfg)
    dataset = get_str(cfg, "dataset")
    kind = get_str(cfg, "kind", "class_il")
    loader = get_loader(dataset)
    name = get_str(cfg, "name", None) or dataset
    seed = get_int(cfg, "class_order_seed", DEFAULT_CLASS_ORDER_SEED)
    limit = get_int(cfg, "limit_per_class", None, minimum=1)
    if kind != "domain_il":
        init_cls, increment = _increments(cfg)
    data = loader({**cfg, "name": name}, resolve_data_root(data_root))
    from cl.engine.cache import attach_image_cache  # scenario.image_cache: decode-once uint8 cache (issue 10)

    attach_image_cache((data.train, data.test), cfg)
    if kind == "domain_il":
        if data.domains_train is None or data.domains_test is None:
            raise ConfigError(
                f"dataset '{dataset}' has no domains, so it cannot make a domain_il stream "
                "(use a multi-domain dataset, e.g. synthetic with synthetic.n_domains > 1)"
            )
        return domain_incremental(
            data.train, data.test, name=name, domains_train=data.domains_train, domains_test=data.domains_test,
            seed=seed, domain_order=cfg.get("domain_order"), limit_per_class=limit,
        )
    return class_incremental(
        data.train, data.test, name=name, init_cls=init_cls, increment=increment, seed=seed,
        shuffle=get_bool(cfg, "shuffle", True), kind=kind, limit_per_class=limit,
    )


def _increments(cfg: dict) -> tuple[int, int]:
    """(init_cls, increment); either one alone means equal-sized tasks."""
    init_cls = get_int(cfg, "init_cls", None, minimum=1)
    increment = get_int(cfg, "increment", None, minimum=1)
    if init_cls is None and increment is None:
        raise ConfigError("a class_il/task_il scenario needs 'init_cls' and 'increment' (classes per experience)")
    return (init_cls or increment), (increment or init_cls)


CLASS_IL = Kind(
    name="class_il", build=build_incremental, protocol=EvalProtocol(),
    metrics=km.incremental, summary=km.incremental_summary, score=km.seen_score,
)
TASK_IL = Kind(
    name="task_il", build=build_incremental, protocol=EvalProtocol(task_ids=True),
    metrics=km.incremental, summary=km.incremental_summary, score=km.seen_score,
)
DOMAIN_IL = Kind(
    name="domain_il", build=build_incremental, protocol=EvalProtocol(),
    metrics=km.domain_incremental, summary=km.incremental_summary, score=km.seen_score,
)

"""Each scenario kind's test-sized stream: needs no download and runs on 2 CPU cores.

Used by `scripts/benchmark.py` (its default scenarios) and tests/test_strategy_contract.py (every strategy on one
stream it supports), so the two cannot disagree on what "the test stream of a kind" is."""
from __future__ import annotations

from typing import Iterable

TEST_STREAMS = {"class_il": "synthetic", "task_il": "synthetic-task", "domain_il": "synthetic-domains",
                "fscil": "synthetic-fscil", "tta": "synthetic-c", "forgetting": "synthetic-forget",
                "text": "synthetic-text", "union_label": "synthetic-xtail"}


def stream_for(supports: Iterable[str]) -> tuple[str, str]:
    """(kind, scenario): the test stream of the first kind in a strategy's `supports` that has one."""
    supports = tuple(supports)
    for kind in supports:
        if kind in TEST_STREAMS:
            return kind, TEST_STREAMS[kind]
    raise ValueError(f"no test stream for any of the kinds {', '.join(supports) or '(none)'}: add one to "
                     f"scenarios.smoke.TEST_STREAMS")

"""Each scenario kind's test-sized stream: needs no download and runs on 2 CPU cores.

Used by `scripts/benchmark.py` (its default scenarios) and tests/test_strategy_contract.py (every strategy on one
stream it supports), so the two cannot disagree on what "the test stream of a kind" is."""
from __future__ import annotations

from typing import Iterable

TEST_STREAMS = {"class_il": "synthetic", "task_il": "synthetic-task", "domain_il": "synthetic-domains",
                "fscil": "synthetic-fscil", "tta": "synthetic-c", "forgetting": "synthetic-forget",
                "text": "synthetic-text", "union_label": "synthetic-xtail"}


# Strategies made for one backbone family run their test stream on it (SparCL sparsifies a ResNet's layer1..4 convs
# and refuses a ViT in one line); every other strategy uses the test stream's own default backbone.
BACKBONES = {"sparcl": "resnet18-tiny"}


def overrides_for(name: str, supports: Iterable[str]) -> list[str]:
    """The config overrides of strategy `name`'s test run: its stream, and its backbone where it needs one."""
    _, scenario = stream_for(supports)
    return [f"strategy={name}", f"scenario={scenario}", *([f"backbone={BACKBONES[name]}"] if name in BACKBONES else [])]


def stream_for(supports: Iterable[str]) -> tuple[str, str]:
    """(kind, scenario): the test stream of the first kind in a strategy's `supports` that has one."""
    supports = tuple(supports)
    for kind in supports:
        if kind in TEST_STREAMS:
            return kind, TEST_STREAMS[kind]
    raise ValueError(f"no test stream for any of the kinds {', '.join(supports) or '(none)'}: add one to "
                     f"scenarios.smoke.TEST_STREAMS")

"""Strategy registry: `strategies.build(cfg.strategy, backbone, stream.info)`.

Modules are imported lazily so that a strategy's optional dependencies are only needed when it is used.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Mapping

from cl.errors import ConfigError
from cl.strategy import Strategy

REGISTRY: dict[str, str] = {
    "finetune": "strategies.finetune:Finetune",
    "joint": "strategies.joint:Joint",
    "simplecil": "strategies.simplecil:SimpleCIL",
    "adam": "strategies.adam:APER",
    "mos": "strategies.mos:MOS",
    "lae": "strategies.lae:LAE",
    "sema": "strategies.sema:SEMA",
    "fsa": "strategies.fsa:FSA",
    # Avalanche's classic baselines (optional extra `avalanche`; docs/avalanche.md)
    **{f"avalanche/{n}": f"strategies.avalanche_bridge:Avalanche{c}" for n, c in (
        ("naive", "Naive"), ("ewc", "EWC"), ("si", "SI"), ("lwf", "LwF"), ("replay", "Replay"), ("gem", "GEM"),
        ("agem", "AGEM"), ("icarl", "ICaRL"), ("gdumb", "GDumb"), ("der", "DER"), ("lfl", "LFL"))},
    "source": "strategies.source:Source",
    "bn_adapt": "strategies.bn_adapt:BNAdapt",
    "tent": "strategies.tent:Tent",
    "cotta": "strategies.cotta:CoTTA",
    "ecotta": "strategies.ecotta:EcoTTA",
    "psmt": "strategies.psmt:PSMT",
    "coso": "strategies.coso:CoSO",
    "gs_lora": "strategies.gs_lora:GSLoRA",
    "gs_lora_pp": "strategies.gs_lora:GSLoRAPP",
    "derpp": "strategies.derpp:DERpp",
    "sparcl": "strategies.sparcl:SparCL",
    "mora": "strategies.mora:MoRA",
    "slm": "strategies.slm:SLM",
}


def names() -> list[str]:
    return sorted(REGISTRY)


def get_class(name: str) -> type[Strategy]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown strategy '{name}'{hint}: valid strategies are {', '.join(names())}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_supported(name: str, kind: str) -> None:
    """Fails before any work when the strategy cannot run on the scenario's kind."""
    cls = get_class(name)
    if kind not in cls.supports:
        able = [n for n in names() if kind in get_class(n).supports]
        raise ConfigError(f"strategy '{name}' does not support {kind} scenarios (it supports "
                          f"{', '.join(cls.supports)}); strategies for {kind}: {', '.join(able) or 'none yet'}")


def build(cfg: Mapping[str, Any], backbone, info) -> Strategy:
    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "train")}
    cls = get_class(cfg["name"])
    check_supported(cfg["name"], info.kind)
    strategy = cls(**params)
    strategy.setup(backbone, info)
    return strategy

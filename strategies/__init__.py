"""Strategy registry: `strategies.build(cfg.strategy, backbone, stream.info, trainer=cfg.trainer)`.

No hand-kept table: a strategy is found by the `name = "..."` its class declares at class level in a module of
this package (found by scanning the source, so that no module, and none of its optional dependencies, is
imported until its strategy is used), merged with other installed packages' `clbench.strategies` entry points
(cl/app/plugins.py). Adding a method is one module, one `configs/strategy/<name>.yaml` and its tests.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

from cl.engine import entry_points as plugins
from cl.engine.errors import ConfigError
from cl.engine.strategy import Strategy
from cl.engine.trainer_config import TrainerConfig

_CLASS = re.compile(r"class\s+(\w+)\b")
_NAME = re.compile(r"""    name\s*=\s*(["'])([^"']+)\1\s*(#.*)?$""")


@functools.lru_cache(maxsize=None)
def builtin() -> dict[str, str]:
    """name -> "strategies.<module>:<Class>" for every top-level class of this package's modules with a class-level
    `name = "..."` line. A line scan of the source, not an import (nor `ast`, 30x slower: ~5 ms against ~170 ms
    for the 24 modules on a loaded 2-core machine); `get_class` checks the imported class's `name` and
    tests/test_plugins.py checks the scan against `ast`."""
    found: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        if path.name.startswith("_"):
            continue
        current = None
        for line in path.read_text(encoding="utf-8").splitlines():
            if line[:1] not in ("", " ", "\t", "#", ")", "]", "}"):  # a top-level statement ends the class
                m = _CLASS.match(line)
                current = m.group(1) if m else None
            elif current and line.startswith("    name"):
                m = _NAME.match(line)
                if m:
                    name, where = m.group(2), f"strategies.{path.stem}:{current}"
                    if name in found:
                        raise RuntimeError(f"strategy name '{name}' is declared twice: {found[name]} and {where}")
                    found[name] = where
    return found


def names() -> list[str]:
    """Built-in strategies and those of installed plugins (a plugin cannot replace a built-in name)."""
    return sorted({*builtin(), *plugins.entry_points("strategies")})


def get_class(name: str) -> type[Strategy]:
    if name in builtin():
        if name in plugins.entry_points("strategies"):
            ep = plugins.entry_points("strategies")[name]
            warnings.warn(f"strategy '{name}' of an installed plugin ({ep.value}) is shadowed by the built-in one")
        module, cls_name = builtin()[name].split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        where = builtin()[name]
    elif name in plugins.entry_points("strategies"):
        cls = plugins.load("strategies", name)
        where = plugins.entry_points("strategies")[name].value
    else:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown strategy '{name}'{hint}: valid strategies are {', '.join(names())}")
    if not (isinstance(cls, type) and issubclass(cls, Strategy)) or cls.name != name:
        raise ConfigError(f"strategy '{name}' = {where} is not a cl.engine.strategy.Strategy subclass whose `name` is "
                          f"'{name}'")
    return cls


def check_supported(name: str, kind: str) -> None:
    """Fails before any work when the strategy cannot run on the scenario's kind."""
    cls = get_class(name)
    if kind not in cls.supports:
        able = [n for n in names() if kind in get_class(n).supports]
        raise ConfigError(f"strategy '{name}' does not support {kind} scenarios (it supports "
                          f"{', '.join(cls.supports)}); strategies for {kind}: {', '.join(able) or 'none yet'}")


# Strategies whose modules live inside transformer blocks (issue 21): on a CNN they fail at start, in one line.
NEEDS_VIT_BLOCKS = {
    "mos": "adapters in every ViT block's MLP",
    "lae": "adapters/prefixes in ViT blocks",
    "sema": "mixtures of adapters in ViT blocks' MLPs",
    "coso": "projected updates of the attention projections (attn.proj)",
}
ADAM_VIT_PEFT = ("adapter", "vpt_shallow", "vpt_deep")


def has_attention_blocks(backbone) -> bool:
    """True for ViT-style backbones (timm ViT blocks and open_clip residual blocks both have an `.attn`)."""
    model = getattr(backbone, "model", backbone)
    return any(hasattr(m, "attn") for m in model.modules())


def check_backbone(name: str, params: Mapping[str, Any], backbone) -> None:
    """Fails before any work when the strategy needs ViT blocks and the backbone (a CNN) has none."""
    why, hint = NEEDS_VIT_BLOCKS.get(name), ""
    if name == "adam" and params.get("peft", "adapter") in ADAM_VIT_PEFT:
        why = f"APER's peft={params.get('peft', 'adapter')} sits in ViT blocks"
        hint = "; or, on this CNN, strategy.peft=ssf (scale-shift after every BatchNorm) or strategy.peft=finetune"
    if why and backbone is not None and not has_attention_blocks(backbone):
        raise ConfigError(f"strategy '{name}' needs a ViT backbone ({why}) and backbone "
                          f"'{getattr(backbone, 'name', '?')}' has no attention blocks: use backbone=vit-tiny, "
                          f"vit-b16 or vit-b16-in21k{hint}")


def build(cfg: Mapping[str, Any], backbone, info, trainer: TrainerConfig | Mapping[str, Any] | None = None) -> Strategy:
    """The strategy, set up. `trainer` (the run's `trainer:` section or its TrainerConfig; None: the trainer
    default) is handed over as `strategy.trainer_cfg` before `setup`: values go trainer -> strategy, never back."""
    params = {k: v for k, v in dict(cfg).items() if k not in ("name", "train")}
    cls = get_class(cfg["name"])
    check_supported(cfg["name"], info.kind)
    check_backbone(cfg["name"], params, backbone)
    strategy = cls(**params)
    if trainer is not None:
        strategy.trainer_cfg = trainer if isinstance(trainer, TrainerConfig) else TrainerConfig.from_mapping(trainer)
    strategy.setup(backbone, info)
    return strategy

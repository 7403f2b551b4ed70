"""Strategy registry: `strategies.build(cfg.strategy, backbone, stream.info, trainer=cfg.trainer)`.

Modules are imported lazily so that a strategy's optional dependencies are only needed when it is used.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Mapping

from cl.errors import ConfigError
from cl.strategy import Strategy
from cl.trainer_config import TrainerConfig

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

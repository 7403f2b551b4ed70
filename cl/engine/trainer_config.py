"""The trainer's settings (`trainer:` in the config), checked without importing torch.

`run.py` checks the composed config with these before it imports torch, timm or any strategy, so a bad value
(`trainer.epochs=abc`, `trainer.lr=-0.1`, `trainer.device=tpu`) fails in a second with one line, like a bad name.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, fields
from typing import Any, Mapping

from cl.engine.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "constant", "multistep")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what torch.device accepts that this project runs on


@dataclass
class TrainerConfig:
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    min_lr: float = 0.0
    milestones: list[int] | None = None  # multistep: lr *= gamma after each of these epochs (torch MultiStepLR)
    gamma: float = 0.1
    clip_grad_norm: float | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    num_workers: int = 0
    eval_future: bool = False
    limit_train_batches: int | None = None
    log_every: int = 10
    progress: bool = True
    stop_after: int | None = None  # stop (resumably) after this many experiences in this process
    keep_checkpoints: int = 2
    deterministic: bool = False  # torch.use_deterministic_algorithms (warn_only) + CUBLAS_WORKSPACE_CONFIG, for GPUs
    feature_cache: bool = True  # encode each image once through a strategy's frozen_encoder (cl/engine/feature_cache.py)
    seed: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "TrainerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean 'trainer.{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown trainer field {unknown[0]!r}{hint}: valid fields are {', '.join(sorted(known))}")
        values = {f.name: _check_field_type(f, cfg[f.name]) for f in fields(cls) if f.name in cfg}
        tc = cls(**values)
        for name, choices in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("precision", PRECISIONS)):
            value = getattr(tc, name)
            if value not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown trainer.{name} {value!r}{hint}: expected one of {', '.join(choices)}")
        for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
            if getattr(tc, name) < 1:
                raise ConfigError(f"trainer.{name} must be at least 1, got {getattr(tc, name)}")
        for name in ("limit_train_batches", "stop_after"):
            if getattr(tc, name) is not None and getattr(tc, name) < 1:
                raise ConfigError(f"trainer.{name} must be at least 1 or null, got {getattr(tc, name)}")
        if tc.num_workers < 0 or tc.keep_checkpoints < 0:
            raise ConfigError("trainer.num_workers and trainer.keep_checkpoints cannot be negative")
        if tc.scheduler == "multistep":
            m = tc.milestones
            if not m or any(a >= b for a, b in zip(m, m[1:])) or m[0] < 1:
                raise ConfigError(f"trainer.scheduler=multistep needs trainer.milestones, increasing epochs >= 1 "
                                  f"after which lr *= trainer.gamma (e.g. [50,100,150]), got {m!r}")
            if tc.gamma <= 0:
                raise ConfigError(f"trainer.gamma must be > 0, got {tc.gamma}")
        for name in ("lr", "weight_decay", "min_lr"):
            value = getattr(tc, name)
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"trainer.{name} must be a finite number >= 0, got {value}: e.g. trainer.{name}="
                                  f"{abs(value) if math.isfinite(value) else 0.01}")
        if not 0 <= tc.momentum < 1:
            raise ConfigError(f"trainer.momentum must be in [0, 1), got {tc.momentum}")
        if tc.clip_grad_norm is not None and not tc.clip_grad_norm > 0:
            raise ConfigError(f"trainer.clip_grad_norm must be > 0 or null, got {tc.clip_grad_norm}")
        if not DEVICE_PATTERN.fullmatch(tc.device):
            close = difflib.get_close_matches(tc.device, ["auto", "cpu", "cuda", "mps"], n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown trainer.device {tc.device!r}{hint}: expected auto, cpu, cuda, cuda:<index> "
                              f"or mps")
        return tc


_FIELD_TYPES = {"int": int, "float": float, "bool": bool, "str": str}


def _check_field_type(f, value: Any) -> Any:
    """The value as the field's declared type (`int`, `float | None`, `list[int] | None`), or a one-line
    `ConfigError`."""
    names = [t.strip() for t in str(f.type).split("|")]
    optional = "None" in names
    if "list[int]" in names:
        if value is None and optional:
            return None
        if value is None or isinstance(value, (str, bytes)) or not hasattr(value, "__iter__") or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"trainer.{f.name} must be a list of integers{' or null' if optional else ''}, "
                              f"got {value!r}")
        return [int(v) for v in value]
    base = _FIELD_TYPES[next(t for t in names if t != "None")]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"trainer.{f.name} cannot be null: give a {base.__name__}")
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, str))
    if not ok:
        kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]
        raise ConfigError(f"trainer.{f.name} must be {kind}{' or null' if optional else ''}, got {value!r}")
    return float(value) if base is float else value


def check_values(cfg: Mapping[str, Any]) -> TrainerConfig:
    """The torch-free part of `cl.app.experiment.check_config`: section shapes, seed, results root, trainer values.

    Called by `run.py` before any heavy import, and again by `check_config` (which adds the checks that need the
    strategy and scenario registries)."""
    for section in ("strategy", "scenario", "backbone", "trainer"):
        if not isinstance(cfg.get(section), Mapping):
            raise ConfigError(f"the config has no '{section}' section: pick one with {section}=<name>")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    root = cfg.get("results_root")
    if root is not None and not isinstance(root, str):
        raise ConfigError(f"results_root must be a folder path, got {root!r}")
    return TrainerConfig.from_mapping({**cfg["trainer"]})

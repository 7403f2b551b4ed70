"""Reading scenario config fields with errors that name the field and the fix (dicts or OmegaConf alike)."""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

from cl.engine.errors import ConfigError

_MISSING = object()


def as_dict(cfg: Any) -> dict:
    """A plain dict from a dict or an OmegaConf DictConfig (interpolations resolved)."""
    if isinstance(cfg, Mapping) and not _is_omegaconf(cfg):
        return dict(cfg)
    if _is_omegaconf(cfg):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    raise ConfigError(f"a scenario config must be a mapping, got {type(cfg).__name__}")


def _is_omegaconf(cfg: Any) -> bool:
    return type(cfg).__module__.startswith("omegaconf")


def get_int(cfg: Mapping, key: str, default: Any = _MISSING, *, minimum: int | None = None, where: str = "scenario"):
    """An int field (None allowed when it is the default or given as null)."""
    value = cfg.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{where} config needs '{key}'")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}.{key} must be >= {minimum}, got {value}")
    return value


def get_float(cfg: Mapping, key: str, default: float, *, where: str = "scenario") -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def get_bool(cfg: Mapping, key: str, default: bool, *, where: str = "scenario") -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
    return value


def get_str(cfg: Mapping, key: str, default: Any = _MISSING, *, where: str = "scenario") -> str:
    value = cfg.get(key, default)
    if value is _MISSING:
        raise ConfigError(f"{where} config needs '{key}'")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
    return value


def check_choice(field: str, value: str, valid: Iterable[str]) -> None:
    """ConfigError listing the valid names and the closest one when `value` is not among them."""
    valid = sorted(valid)
    if value in valid:
        return
    close = difflib.get_close_matches(str(value), valid, n=1, cutoff=0.0)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown {field} '{value}'{hint} (valid: {', '.join(valid)})")

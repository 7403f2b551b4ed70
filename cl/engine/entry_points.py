"""Entry points of other installed packages: the one way a plugin's strategy, dataset reader or backbone source
is found (`clbench.strategies`, `clbench.datasets`, `clbench.backbones`; config folders: `clbench.configs`, read
by cl/app/plugins.py). Each registry of a lower layer asks here by name, and imports the object only when a
config names it, so a plugin's dependencies cost nothing until it is used (docs/plugins.md)."""
from __future__ import annotations

import functools
from typing import Any

GROUPS = {
    "strategies": "clbench.strategies",
    "datasets": "clbench.datasets",
    "backbones": "clbench.backbones",
    "configs": "clbench.configs",
}


@functools.lru_cache(maxsize=None)
def entry_points(kind: str) -> dict:
    """name -> importlib.metadata.EntryPoint of one group (`kind`: strategies, datasets, backbones, configs);
    where two distributions use one name the first found wins, as an import would."""
    from importlib.metadata import entry_points as _entry_points

    found: dict = {}
    for ep in _entry_points(group=GROUPS[kind]):
        found.setdefault(ep.name, ep)
    return found


def _origin(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"package '{dist.name}'" if dist is not None else "an installed package"


def load(kind: str, name: str) -> Any:
    """The object entry point `name` of group `kind` names, imported now; a one-line error if it cannot be."""
    from cl.engine.errors import ConfigError

    ep = entry_points(kind)[name]
    try:
        return ep.load()
    except Exception as exc:  # noqa: BLE001 - any failure of a plugin's import becomes one line naming it
        raise ConfigError(f"cannot load {kind[:-1]} '{name}' = '{ep.value}' from {_origin(ep)}: "
                          f"{type(exc).__name__}: {exc}") from exc

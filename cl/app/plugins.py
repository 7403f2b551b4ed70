"""Where configs and named parts come from besides this repository: other installed packages and the user's folders.

- The built-in configs: the checkout's top-level `configs/`, or `cl/configs/` inside an installed wheel (setup.py
  copies the one folder there at build time), so `clbench` runs from any folder without `-e`.
- Entry points of other installed packages (`pyproject.toml`: `[project.entry-points."clbench.strategies"]` ...):
  `clbench.strategies` name = "pkg.module:StrategyClass", `clbench.datasets` name = "pkg.module:loader"
  (`loader(cfg, data_root) -> scenarios.datasets.registry.LoadedData`), `clbench.backbones` source = "pkg.module:build"
  (`build(cfg) -> cl.models.backbones.Backbone`), and `clbench.configs` any-name = "pkg:folder" (the folder `folder`
  inside package `pkg`; found without importing `pkg`) or "pkg.sub" (that package's own folder), holding config
  groups (`strategy/<name>.yaml`, `scenario/...`) that join Hydra's search path. Loaded only when named, so a
  plugin's dependencies cost nothing until it is used.
- The user's own config folders: `CLBENCH_CONFIG_PATH` (folders separated by os.pathsep), or Hydra's own
  `hydra.searchpath=[file:///abs/dir]` override on the command line. Both are seen by the early name checks.

The built-in configs come first on the search path, so a plugin or user config with a built-in name is shadowed;
pick new names.
"""
from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import os
from pathlib import Path
from typing import Iterable, Sequence

from cl.engine.entry_points import _origin, entry_points

CONFIG_PATH_ENV = "CLBENCH_CONFIG_PATH"


@functools.lru_cache(maxsize=None)
def builtin_config_dir() -> Path:
    """`cl/configs` in an installed wheel, else the checkout's `configs/` beside the `cl` package."""
    root = Path(str(importlib.resources.files("cl")))
    for candidate in (root / "configs", root.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise RuntimeError(f"clbench's configs are missing: neither {root / 'configs'} (an installed wheel) nor "
                       f"{root.parent / 'configs'} (a checkout) holds config.yaml; reinstall clbench")


def _package_folder(module: str) -> Path | None:
    """The folder of package `module` without importing it (a dotted name imports its parents only)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def plugin_config_dirs() -> list[Path]:
    """The config folders `clbench.configs` entry points name, in entry-point order."""
    from cl.engine.errors import ConfigError

    dirs = []
    for name, ep in entry_points("configs").items():
        module, _, sub = ep.value.partition(":")
        folder = _package_folder(module.strip())
        folder = folder / sub.strip() if folder is not None and sub.strip() else folder
        if folder is None or not folder.is_dir():
            raise ConfigError(f"config folder '{name}' = '{ep.value}' from {_origin(ep)} is not a folder: "
                              f"reinstall that package, or fix its clbench.configs entry point")
        dirs.append(folder)
    return dirs


def user_config_dirs() -> list[Path]:
    """The folders in $CLBENCH_CONFIG_PATH; a name that is not a folder is a one-line error."""
    from cl.engine.errors import ConfigError

    dirs = []
    for part in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep):
        if not part.strip():
            continue
        folder = Path(part).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{CONFIG_PATH_ENV} names '{part}', which is not a folder: fix or remove it")
        dirs.append(folder.resolve())
    return dirs


def searchpath_override_dirs(argv: Sequence[str]) -> list[Path]:
    """The folders a `hydra.searchpath=[...]` command-line override adds (file://, pkg:// or plain paths); an
    override Hydra cannot parse adds none here (Hydra reports it)."""
    values = [a.partition("=")[2] for a in argv if a.lstrip("+").partition("=")[0] == "hydra.searchpath"]
    if not values:
        return []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        items = OverridesParser.create().parse_override(f"hydra.searchpath={values[-1]}").value()
    except Exception:  # noqa: BLE001
        return []
    dirs = []
    for item in items if isinstance(items, list) else [items]:
        item = str(item)
        if item.startswith("pkg://"):
            folder = _package_folder(item[len("pkg://"):].replace("/", "."))
        else:
            folder = Path(item.removeprefix("file://")).expanduser()
        if folder is not None and folder.is_dir():
            dirs.append(folder)
    return dirs


def config_dirs(argv: Sequence[str] = ()) -> list[Path]:
    """Every config folder in Hydra's search order: built-in, $CLBENCH_CONFIG_PATH, plugins, hydra.searchpath."""
    return [builtin_config_dir(), *user_config_dirs(), *plugin_config_dirs(), *searchpath_override_dirs(argv)]


def group_options(group: str, dirs: Iterable[Path]) -> list[str]:
    """The config names of `group` across `dirs` (`strategy` -> finetune, ..., avalanche/ewc, ...)."""
    names: set[str] = set()
    for root in dirs:
        base = Path(root) / group
        if base.is_dir():
            # files whose name starts with `_` (configs/strategy/avalanche/_base.yaml) are shared parts that other
            # configs include through their defaults list, not choices
            names.update(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml")
                         if not p.name.startswith("_"))
    return sorted(names)


@functools.lru_cache(maxsize=None)
def _search_path_plugin() -> type:
    from hydra.core.config_search_path import ConfigSearchPath
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class ClbenchSearchPath(SearchPathPlugin):
        """Appends $CLBENCH_CONFIG_PATH's folders and the installed plugins' config folders after the built-in one."""

        def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
            for folder in user_config_dirs():
                search_path.append(CONFIG_PATH_ENV, f"file://{folder}")
            for folder in plugin_config_dirs():
                search_path.append("clbench.configs", f"file://{folder}")

    ClbenchSearchPath.__module__ = __name__
    return ClbenchSearchPath


def register_config_search_path() -> None:
    """Makes every later Hydra composition in this process (hydra.main, compose) search the extra folders."""
    from hydra.core.plugins import Plugins

    Plugins.instance().register(_search_path_plugin())

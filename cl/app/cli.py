"""Command-line glue around Hydra: early checks of config-group names, error printing, composition for tests.

`explain_config_error` turns Hydra's and OmegaConf's composition errors (several lines, a link, a hint to set
HYDRA_FULL_ERROR) into one line that names the fix, e.g. the closest valid key for a misspelled one.
"""
from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from cl.app import plugins

# The built-in configs: the checkout's `configs/`, or `cl/configs` in an installed wheel (cl/app/plugins.py).
CONFIG_DIR = plugins.builtin_config_dir()


def _register_resolvers() -> None:
    """`${clbench_slurm:CPUS}` in configs/hydra/launcher/slurm.yaml: a Slurm request that fits the partition."""
    from omegaconf import OmegaConf

    def slurm(name: str) -> int:
        from cl.app.slurm import fitted

        return fitted(name)

    if not OmegaConf.has_resolver("clbench_slurm"):
        OmegaConf.register_new_resolver("clbench_slurm", slurm)


_register_resolvers()
CHECKED_GROUPS = ("strategy", "scenario", "backbone", "trainer", "debug", "experiment", "logger")


def group_options(group: str, config_dir: Path | None = None, argv: Sequence[str] = ()) -> list[str]:
    """The names `group=` accepts: from `config_dir` alone when given, else from every folder on the search path
    (built-in, $CLBENCH_CONFIG_PATH, installed plugins, the command line's hydra.searchpath)."""
    dirs = [config_dir] if config_dir is not None else plugins.config_dirs(argv)
    return plugins.group_options(group, dirs)


def check_group_overrides(argv: Sequence[str], config_dir: Path | None = None) -> str | None:
    """The first unknown `group=name` on the command line, as a one-line message naming the closest choice."""
    from cl.engine.errors import ConfigError

    try:
        return _check_group_overrides(argv, config_dir)
    except ConfigError as exc:  # a plugin's or $CLBENCH_CONFIG_PATH's folder is missing
        return str(exc)


def _check_group_overrides(argv: Sequence[str], config_dir: Path | None) -> str | None:
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.startswith("+") and key.lstrip("+") in CHECKED_GROUPS:
            return appended_group_message(key.lstrip("+"), value)
        key = key.lstrip("+~")
        if not sep or key not in CHECKED_GROUPS or value in ("", "null"):
            continue
        if any(ch in value for ch in "()[]{}*$"):  # sweeps like glob(*) or range(): Hydra checks those itself
            continue
        options = group_options(key, config_dir, argv)
        for name in value.split(","):
            if name not in options:
                close = difflib.get_close_matches(name, options, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                return f"unknown {key} {shown(name)}{hint}: valid choices are {', '.join(options)}"
    return None


def appended_group_message(group: str, value: str) -> str:
    """`+experiment=x` (the spelling from before `experiment` was in configs/config.yaml's defaults list): Hydra
    would say "Multiple values for experiment"; this names the fix."""
    return (f"{shown(f'+{group}={value}')}: '{group}' is already in the defaults list (configs/config.yaml), so it "
            f"is chosen without the '+': write {shown(f'{group}={value}')}")


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def compose_config(overrides: Sequence[str] = ()) -> dict:
    """The config `python run.py <overrides>` would run, resolved to plain containers (for tests and scripts).

    Every composition problem is a `ConfigError` with a one-line message, as on the command line."""
    from cl.engine.errors import ConfigError

    message = check_group_overrides(overrides)
    if message:
        raise ConfigError(message)
    try:
        return _compose(overrides, resolve=True)
    except Exception as exc:  # noqa: BLE001 - only composition errors are translated; others re-raised
        if not is_config_error(exc):
            raise
        raise ConfigError(explain_config_error(exc, overrides)) from None


def _compose(overrides: Sequence[str], resolve: bool) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    plugins.register_config_search_path()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=resolve)


def is_config_error(exc: BaseException) -> bool:
    """Hydra's and OmegaConf's own errors, and the ValueError Hydra raises for `group=null`-like overrides."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, (HydraException, OmegaConfBaseException)):
        return True
    return isinstance(exc, ValueError) and "override" in str(exc).lower()


def shown(text: Any) -> str:
    """User input quoted for a one-line message: control characters (a newline in a value) escaped."""
    text = str(text)
    return f"'{text}'" if text.isprintable() else repr(text)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def config_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config, parents included (`trainer`, `trainer.epochs`, ...)."""
    out: list[str] = []
    if isinstance(cfg, dict):
        for key, value in cfg.items():
            dotted = f"{prefix}{key}"
            out.append(dotted)
            out += config_keys(value, dotted + ".")
    return out


def closest_key(key: str, keys: Iterable[str]) -> str | None:
    """A sibling with a close name first (`trainer.epoch` -> `trainer.epochs`), then any close dotted key
    (`trainr.epochs` -> `trainer.epochs`, `strategy.lrr` -> `strategy.train.lr`); never one of the key's parents."""
    ancestors = {key[:i] for i, ch in enumerate(key) if ch == "."}
    keys = [k for k in keys if not k.startswith("hydra") and k not in ancestors]
    parents = {k.rpartition(".")[0] for k in keys}
    parent, _, leaf = key.rpartition(".")
    for pool in ([k for k in keys if k not in parents], keys):  # values first, then sections
        siblings = {k.rpartition(".")[2]: k for k in pool if k.rpartition(".")[0] == parent}
        close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
        if close:
            return siblings[close[0]]
        close = difflib.get_close_matches(key, pool, n=1, cutoff=0.75)
        if close:
            return close[0]
    return None


def _failing_override(overrides: Sequence[str]) -> str | None:
    """The first override Hydra's grammar rejects on its own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in overrides:
        try:
            parser.parse_override(arg)
        except Exception:  # noqa: BLE001
            return arg
    return None


def _keys_for_suggestions(overrides: Sequence[str]) -> list[str]:
    """The keys of the config the command line selects, composed from its group choices alone."""
    groups = []
    for arg in overrides:
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in CHECKED_GROUPS and value and not any(c in value for c in "()[]{}*$,"):
            groups.append(arg)
    for attempt in (groups, []):
        try:
            return config_keys(_compose(attempt, resolve=False))
        except Exception:  # noqa: BLE001 - suggestions are a courtesy
            continue
    return []


def explain_config_error(exc: BaseException, overrides: Sequence[str] = ()) -> str:
    """One line for a Hydra/OmegaConf composition error, naming the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import InterpolationResolutionError, OmegaConfBaseException

    text = str(exc)
    m = re.search(r"Could not override '([^']+)'", text)
    if m:
        key = m.group(1)
        value = next((a.partition("=")[2] for a in overrides if a.partition("=")[0] == key), "...")
        keys = _keys_for_suggestions(overrides)
        close = closest_key(key, keys)
        hint = f" (did you mean '{close}'?)" if close else ""
        if not close:
            # The deepest part of the key that exists, and what it holds.
            parent = key
            while "." in parent and parent not in keys:
                parent = parent.rpartition(".")[0]
            below = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent] if parent in keys else []
            if below:
                hint = f" ('{parent}' holds: {', '.join(below[:15])}{', ...' if len(below) > 15 else ''})"
        return (f"unknown config key {shown(key)}{hint}: fix the spelling, or write {shown(f'+{key}={value}')} to add "
                f"a new key on purpose")
    m = re.search(r"Multiple values for (\S+?)\. To override", text)
    if m:  # `+group=x` for a group of the defaults list (check_group_overrides catches the known groups first)
        group = m.group(1)
        value = next((a.partition("=")[2] for a in overrides if a.partition("=")[0].lstrip("+") == group), "...")
        return appended_group_message(group, value)
    m = re.search(r"An item is already at '([^']+)'", text)
    if m:
        key = m.group(1)
        return f"config key {shown(key)} already exists: set it without the '+' ({shown(key + '=...')}), or with '++' to add-or-set"
    m = re.search(r"Could not delete from config. '([^']+)' does not exist", text)
    if m:
        key = m.group(1)
        close = closest_key(key, _keys_for_suggestions(overrides))
        hint = f" (did you mean '{close}'?)" if close else ""
        return f"cannot delete config key {shown(key)}: there is no such key{hint}"
    if "Ambiguous value for argument" in text:
        arg = re.search(r"argument '([^']*)'", text)
        return (f"ambiguous value in {shown(arg.group(1) if arg else '?')}: a comma list sweeps only with -m (--multirun); "
                f"for a list write key=[a,b], for a string quote it: key='a,b'")
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not (?:find|load) '([^'/]+)/([^']*)'", text)
        if m:
            group, name = m.group(1), m.group(2)
            options = group_options(group, argv=overrides)
            close = difflib.get_close_matches(name, options, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            if not name:
                return f"{group}= needs a name: valid choices are {', '.join(options)}"
            return f"unknown {group} {shown(name)}{hint}: valid choices are {', '.join(options)}"
        return _first_line(text)
    if isinstance(exc, OverrideParseException):
        arg = re.search(r"Error parsing override '([^']*)'", text)
        culprit = arg.group(1) if arg else _failing_override(overrides)
        where = shown(culprit) if culprit is not None else "an override"
        reason = _first_line(text)
        if arg and reason.startswith("Error parsing override"):
            reason = _first_line(text.split("\n", 1)[1] if "\n" in text else "")
        return (f"cannot parse {where} ({shown(reason)[1:-1] if reason.isprintable() else shown(reason)}): write key=value, and quote values with spaces or special "
                f"characters: key='a value'")
    if isinstance(exc, InterpolationResolutionError):
        key = re.search(r"full_key: (\S+)", text)
        return (f"cannot resolve the config at '{key.group(1) if key else '?'}': {_first_line(text)}; "
                f"fix the ${{...}} reference or the environment variable it reads")
    if isinstance(exc, OmegaConfBaseException):
        key = re.search(r"full_key: (\S+)", text)
        where = f" at '{key.group(1)}'" if key else ""
        return f"invalid config{where}: {_first_line(text)}"
    if isinstance(exc, ValueError) and "Config group override" in text:
        return (f"invalid override ({_first_line(text)}): a config group takes a name "
                f"({', '.join(CHECKED_GROUPS)}: group=name)")
    return _first_line(text) or type(exc).__name__

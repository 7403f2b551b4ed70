"""Command-line glue around Hydra: early checks of config-group names, error printing, composition for tests."""
from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Sequence

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CHECKED_GROUPS = ("strategy", "scenario", "backbone", "trainer", "debug", "experiment")


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    base = config_dir / group
    return sorted(str(p.relative_to(base).with_suffix("")) for p in base.rglob("*.yaml"))


def check_group_overrides(argv: Sequence[str], config_dir: Path = CONFIG_DIR) -> str | None:
    """The first unknown `group=name` on the command line, as a one-line message naming the closest choice."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in CHECKED_GROUPS or value in ("", "null"):
            continue
        if any(ch in value for ch in "()[]{}*$"):  # sweeps like glob(*) or range(): Hydra checks those itself
            continue
        options = group_options(key, config_dir)
        for name in value.split(","):
            if name not in options:
                close = difflib.get_close_matches(name, options, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                return f"unknown {key} '{name}'{hint}: valid choices are {', '.join(options)}"
    return None


def normalize_overrides(argv: Sequence[str]) -> list[str]:
    """`experiment=x` -> `+experiment=x`: presets are appended to the defaults list (the lightning-hydra-template
    spelling and the `+` spelling both work)."""
    return [f"+{a}" if a.startswith("experiment=") else a for a in argv]


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def compose_config(overrides: Sequence[str] = ()) -> dict:
    """The config `python run.py <overrides>` would run, resolved to plain containers (for tests and scripts)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    overrides = normalize_overrides(overrides)
    message = check_group_overrides(overrides)
    if message:
        from .errors import ConfigError

        raise ConfigError(message)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)

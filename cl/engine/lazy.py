"""`load("package.module:attr")`: the registries name their entries this way so that an entry's optional
dependencies (open_clip, transformers, avalanche, ...) are imported only when it is used."""
from __future__ import annotations

import importlib
from typing import Any


def load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)

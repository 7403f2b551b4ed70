"""One place for weights that the project pre-trains itself, once, and caches under the data root.

Why: a few test-sized backbones are only meaningful "pre-trained" (X-TAIL's tiny CLIP, the tiny ViT of the
pre-trained-model methods), and no real weights exist for them. Each such backbone states its pre-training as a
plain settings mapping and a `train()` function; this module turns that into a cached file:

- the file name is `<prefix>-<key>.safetensors` where `key` hashes every setting (never where the cache lives);
- the file is trained only when missing, then written atomically (a concurrent first run trains its own copy and
  one of them wins; a crash leaves no half-written file);
- training runs under its own RNG (torch CPU, NumPy's and Python's global generators are saved and restored), so
  building the cache does not change the run that asked for it: the same command gives the same numbers whether
  or not the cache existed.

Used by scenarios/xtail_warmup.py (clip-tiny-xtail) and scenarios/vit_warmup.py (vit-tiny-pretrained).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch


def cache_key(settings: Mapping[str, Any]) -> str:
    """16 hex digits of sha256 over the settings as sorted JSON (the settings must be JSON-able)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def cache_file(cache_dir: str | os.PathLike, prefix: str, settings: Mapping[str, Any]) -> tuple[Path, str]:
    """(file, key) for these settings under `cache_dir`."""
    key = cache_key(settings)
    return Path(str(cache_dir)).expanduser() / f"{prefix}-{key}.safetensors", key


@contextlib.contextmanager
def isolated_rng(seed: int | None = None) -> Iterator[None]:
    """Runs the body under its own RNG: torch (CPU), NumPy's and Python's global states are restored after it."""
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(int(seed))
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def save_atomic(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Writes a safetensors file through a uniquely named temporary file and a rename.

    The temporary name comes from uuid4 (os.urandom), not from a seeded generator, so saving draws nothing from
    the run's RNG."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def cached_weights(cache_dir: str | os.PathLike, prefix: str, settings: Mapping[str, Any],
                   train: Callable[[], Mapping[str, torch.Tensor]], seed: int | None = None) -> tuple[Path, str]:
    """(path, key) of the weights `train()` gives for `settings`: trained (under `isolated_rng(seed)`) and saved
    atomically only when `cache_dir` has no copy yet."""
    path, key = cache_file(cache_dir, prefix, settings)
    if not path.exists():
        with isolated_rng(seed):
            state = train()
        save_atomic(state, path)
    return path, key

"""Weights the project trains once and reuses: the one mechanism behind every cached "pre-trained" model.

Users: synthetic-c's source ResNet (cl/app/testbeds/synthetic_c.py), synthetic-xtail's warmed tiny CLIP
(cl/app/testbeds/xtail_warmup.py), fashion-mnist-c's fine-tuned EfficientNet-Lite0 (scenarios/datasets/fashion_mnist_c.py) and the
pre-trained tiny ViT (cl/app/testbeds/vit_warmup.py).

- **Key**: a hash of every setting the weights depend on (JSON, sorted keys), never of where the cache lives;
  the file is `<cache_dir>/<prefix>-<key>.safetensors`.
- **Own RNG**: training runs under `isolated_rng` (torch, NumPy and Python states restored), so building the cache
  leaves the asking run's random state as it found it: a run gives the same numbers whether the cache existed or not.
- **Atomic**: written to a uniquely named temporary file, then renamed; concurrent first runs each train a copy
  and one of them wins, a reader never sees half a file.
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


def settings_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_file(cache_dir: str | os.PathLike, prefix: str, settings: Mapping[str, Any]) -> tuple[Path, str]:
    key = settings_key(settings)
    return Path(cache_dir).expanduser() / f"{prefix}-{key}.safetensors", key


def save_atomic(state: Mapping[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def isolated_rng(seed: int | None = None) -> Iterator[None]:
    """The body runs under its own RNG: torch's (CPU, and CUDA where initialised), NumPy's and Python's global
    states are restored after it, so a cache built inside a run leaves that run's draws as they were."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(int(seed))
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def cached_weights(cache_dir: str | os.PathLike, prefix: str, settings: Mapping[str, Any],
                   train: Callable[[], Mapping[str, torch.Tensor]], seed: int | None = 0) -> tuple[Path, str]:
    """(file, key) of the weights `train()` returns for `settings`, trained only when the cache has no copy.

    `train` runs under `isolated_rng(seed)`; it returns a state dict."""
    path, key = cache_file(cache_dir, prefix, settings)
    if not path.exists():
        with isolated_rng(seed):
            state = train()
        save_atomic(state, path)
    return path, key


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))

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
- **Resumable**: a `train` that takes a `checkpoint` argument gets a `BuildCheckpoint`: it saves its partial state
  (weights, optimiser, step, the RNG states it draws from) when `checkpoint.due()`, atomically, next to the cache
  file (`.<prefix>-<key>.partial.pt`), and starts from `checkpoint.load()` when one is there. A build killed part
  way (SIGKILL after Slurm's grace period, Ctrl-C twice, a crash) then resumes where it was saved instead of
  starting over, and ends with the same weights as an uninterrupted build. (A single SIGTERM or Ctrl-C during a
  run's build only marks the run to stop: the build finishes and is cached, then the run stops at its first step.)
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import random
import time
import uuid
import warnings
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


CHECKPOINT_EVERY_S = 10.0  # a killed build loses at most this much work (plus one step)


class BuildCheckpoint:
    """The partial state of one cache entry's build, so that a killed build resumes instead of starting over.

    The training loop calls `load()` once (None: start from scratch) and `save(state)` whenever `due()`; `state`
    holds tensors, numbers and (nested) dicts/lists of them: `torch.save` to a temporary file, then a rename, so a
    kill during the write leaves the previous partial state intact. A file that cannot be read is ignored (with a
    warning) and the build starts over."""

    def __init__(self, path: Path, every_s: float = CHECKPOINT_EVERY_S):
        self.path = Path(path)
        self.every_s = float(every_s)
        self._last = time.monotonic()
        self.saves = 0

    def load(self) -> dict | None:
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged or from an incompatible version: start over
            warnings.warn(f"ignoring the unreadable partial build {self.path} ({type(exc).__name__}); starting over")
            return None
        self._last = time.monotonic()
        return state

    def due(self) -> bool:
        return time.monotonic() - self._last >= self.every_s

    def save(self, state: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        torch.save(dict(state), tmp)
        os.replace(tmp, self.path)
        self._last = time.monotonic()
        self.saves += 1

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def partial_file(path: Path) -> Path:
    """Where the partial build of the cache file `path` is kept (hidden, beside it; same key)."""
    return path.with_name(f".{path.name.removesuffix('.safetensors')}.partial.pt")


def cached_weights(cache_dir: str | os.PathLike, prefix: str, settings: Mapping[str, Any],
                   train: Callable[..., Mapping[str, torch.Tensor]], seed: int | None = 0,
                   checkpoint_every_s: float = CHECKPOINT_EVERY_S) -> tuple[Path, str]:
    """(file, key) of the weights `train()` returns for `settings`, trained only when the cache has no copy.

    `train` runs under `isolated_rng(seed)`; it returns a state dict. A `train` with a `checkpoint` parameter is
    resumable: it is called with a `BuildCheckpoint` (module docstring), removed once the weights are cached."""
    path, key = cache_file(cache_dir, prefix, settings)
    if not path.exists():
        resumable = "checkpoint" in inspect.signature(train).parameters
        ckpt = BuildCheckpoint(partial_file(path), checkpoint_every_s) if resumable else None
        with isolated_rng(seed):
            state = train(checkpoint=ckpt) if resumable else train()
        save_atomic(state, path)
        if ckpt is not None:
            ckpt.clear()
    return path, key


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))

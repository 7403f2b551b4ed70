"""Run directories: deterministic location, atomic writes, per-experience checkpoints, event log.

`<results_root>/<config hash>/` holds `result.json`, `acc_matrix.csv`, `events.jsonl` and
`checkpoints/exp_XXX.pt`. Every file is written to a temporary name and renamed, so a kill at any moment
leaves either the old or the new file, never half of one. Checkpoints hold plain tensors and numbers
(`torch.load(weights_only=True)`), never pickled objects, plus a sha256 so corruption is detected.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

# Config keys that say where or how verbosely to run, not what is computed: they do not change the hash.
NON_SEMANTIC_KEYS = ("results_root", "data_root", "hydra", "trainer.progress", "trainer.stop_after",
                     "trainer.device", "trainer.num_workers", "trainer.keep_checkpoints", "trainer.log_every")


def _drop(cfg: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        if isinstance(cfg.get(head), dict):
            _drop(cfg[head], rest)
    else:
        cfg.pop(head, None)


def config_hash(cfg: Mapping[str, Any], length: int = 16) -> str:
    """Hash of the resolved config minus `NON_SEMANTIC_KEYS`: the same experiment maps to the same directory."""
    clean = json.loads(json.dumps(cfg, default=str))
    for key in NON_SEMANTIC_KEYS:
        _drop(clean, key)
    blob = json.dumps(clean, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def matrix_csv(matrix: list[list[float | None]]) -> str:
    """Rows = after training on experience i, columns = test data of experience j (percent)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    n = max((len(r) for r in matrix), default=0)
    writer.writerow(["trained_on"] + [f"exp_{j}" for j in range(n)])
    for i, row in enumerate(matrix):
        writer.writerow([f"exp_{i}"] + ["" if v is None else f"{v:.4f}" for v in row])
    return buf.getvalue()


class RunDir:
    """The directory of one run, and the only code that writes in it."""

    def __init__(self, root: str | os.PathLike, run_id: str):
        self.path = Path(root).expanduser().resolve() / run_id
        self.run_id = run_id
        self.ckpt_dir = self.path / "checkpoints"

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    def create(self) -> None:
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)

    # --- results ---------------------------------------------------------------------------------
    def read_result(self) -> dict | None:
        if not self.result_path.is_file():
            return None
        return json.loads(self.result_path.read_text())

    def write_result(self, result: Mapping[str, Any]) -> None:
        atomic_write_json(self.result_path, result)
        atomic_write_text(self.path / "acc_matrix.csv", matrix_csv(result.get("acc_matrix", [])))

    def log_event(self, event: str, **fields: Any) -> None:
        """Appends one JSON line; a line is written in one call, so a kill leaves whole lines."""
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=_json_default)
        with open(self.path / "events.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def events(self) -> list[dict]:
        p = self.path / "events.jsonl"
        if not p.is_file():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a torn last line after a hard kill
                continue
        return out

    # --- checkpoints -----------------------------------------------------------------------------
    def checkpoint_path(self, index: int) -> Path:
        return self.ckpt_dir / f"exp_{index:03d}.pt"

    def save_checkpoint(self, index: int, state: Mapping[str, Any], keep: int = 2) -> Path:
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        data = buf.getvalue()
        path = self.checkpoint_path(index)
        atomic_write_bytes(path, data)
        atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")
        for old in self._checkpoints()[:-keep] if keep > 0 else []:
            old.unlink(missing_ok=True)
            old.with_suffix(".sha256").unlink(missing_ok=True)
        return path

    def _checkpoints(self) -> list[Path]:
        return sorted(self.ckpt_dir.glob("exp_*.pt")) if self.ckpt_dir.is_dir() else []

    def load_latest_checkpoint(self, warn=print) -> dict | None:
        """The newest checkpoint whose checksum matches; a corrupt one falls back to the previous, with a warning."""
        for path in reversed(self._checkpoints()):
            digest_file = path.with_suffix(".sha256")
            data = path.read_bytes()
            if not digest_file.is_file() or digest_file.read_text().strip() != hashlib.sha256(data).hexdigest():
                warn(f"warning: checkpoint {path.name} is corrupt or incomplete; falling back to the previous one")
                continue
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return None


def finished_indices(events: Iterable[Mapping[str, Any]]) -> list[int]:
    return sorted({int(e["experience"]) for e in events if e.get("event") == "experience_end"})

"""Run directories: deterministic location, atomic writes, per-experience checkpoints, event log.

`<results_root>/<config hash>/` holds `result.json`, `acc_matrix.csv`, `events.jsonl` and
`checkpoints/exp_XXX.pt` (plus `checkpoints/partial.pt` while an interrupted experience waits to be resumed).
Every file is written to a temporary name and renamed, so a kill at any moment leaves either the old or the new
file, never half of one. Checkpoints hold plain tensors and numbers (`torch.load(weights_only=True)`), never
pickled objects, plus a sha256 so corruption is detected. `run.lock` (held with `fcntl.flock`, which the kernel
releases when the process dies, even on SIGKILL) keeps a second process off the same run directory.
"""
from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from cl.engine.errors import ResultsError, RunLockedError

# Config keys that say where or how verbosely to run, not what is computed: they do not change the hash.
NON_SEMANTIC_KEYS = ("results_root", "data_root", "hydra", "trainer.progress", "trainer.stop_after",
                     "trainer.device", "trainer.num_workers", "trainer.keep_checkpoints", "trainer.log_every",
                     "trainer.deterministic", "logger",  # where metrics are also sent, not what is computed
                     # `fail` never produces a result and `skip` changes nothing on a clean copy; what `skip` dropped
                     # is recorded in the result's `data_warnings` (the hash never covers the data's content).
                     "scenario.bad_images",
                     # MOS's T test-time passes in one batch or T: the same predictions and stored sets (tested)
                     "strategy.batched_eval",
                     # LAE's extra test passes that report its online and offline modules: metrics added, the run's
                     # training and predictions unchanged (they run under their own RNG; tests/test_lae.py)
                     "strategy.record_members",
                     # a disk budget for the image cache: whether it is used, never what is computed
                     "scenario.image_cache_max_gb",
                     # what `python run.py` alone compares (cl/app/compare.py), not what one run computes
                     "compare")


# Trainer values that strategy configs copied back before issue 22 (`lr: ${trainer.lr}`): the strategies now receive
# them from the trainer at setup (`Strategy.trainer_cfg`), so their sections no longer hold them (absent, or null for
# "the trainer's"). The hash puts the copies back (strategy key <- trainer key, where the strategy's value is absent
# or null), so the composed config hashes as its old form did and every run directory made before keeps its name
# (tests/test_run_hash_stable.py pins every strategy's and preset's hash from before the change). A literal value
# (`strategy.ca_weight_decay=0.01`) is kept as it is, as before. Keys: a strategy name, or a prefix ending in '/'.
_AVALANCHE = ("epochs", "batch_size", "eval_batch_size", "optimizer", "lr", "momentum", "weight_decay")
LEGACY_TRAINER_COPIES: dict[str, dict[str, str]] = {
    "avalanche/": {k: k for k in _AVALANCHE},
    "mos": {"ca_weight_decay": "weight_decay"},
    "gs_lora": {"prox_lr": "lr"},
    "gs_lora_pp": {"prox_lr": "lr"},
    # SEMA's seven copies (configs/strategy/sema.yaml before issue 22)
    "sema": {"func_epoch": "epochs", "func_lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay",
             "min_lr": "min_lr", "limit_train_batches": "limit_train_batches", "precision": "precision"},
}


def _put_back_trainer_copies(clean: dict) -> None:
    strategy, trainer = clean.get("strategy"), clean.get("trainer")
    if not isinstance(strategy, dict) or not isinstance(trainer, dict):
        return
    name = str(strategy.get("name", ""))
    for key, copies in LEGACY_TRAINER_COPIES.items():
        if name == key or (key.endswith("/") and name.startswith(key)):
            for skey, tkey in copies.items():
                if strategy.get(skey) is None and tkey in trainer:
                    strategy[skey] = trainer[tkey]


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
    _put_back_trainer_copies(clean)  # before the trainer's non-semantic keys are dropped (none is copied, but safe)
    for key in NON_SEMANTIC_KEYS:
        _drop(clean, key)
    trainer = clean.get("trainer")
    if isinstance(trainer, dict) and trainer.get("scheduler") != "multistep":
        # the step schedule's settings act only under scheduler=multistep: elsewhere they would move every run's
        # directory for nothing (runs from before the option keep theirs)
        trainer.pop("milestones", None)
        trainer.pop("gamma", None)
    scenario = clean.get("scenario")
    if isinstance(scenario, dict) and scenario.get("image_cache") in (False, "exact", None):
        # exact: the same tensors as reading the files (cl/engine/cache.py): a speed setting, like no cache at all
        scenario.pop("image_cache", None)
        scenario.pop("image_cache_size", None)
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


def describe_write_error(path: Path, exc: OSError, root: Path | None = None) -> str:
    """One line naming the file, the cause and the fix."""
    where = root or path.parent
    if exc.errno == errno.ENOSPC or exc.errno == errno.EDQUOT:
        why = "no space left on device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
        return (f"could not write {path}: {why} ({errno.errorcode[exc.errno]}); the previous result and checkpoints "
                f"are intact: free space under {where} and run the same command to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST):
        return (f"cannot write under {where} ({exc.strerror or type(exc).__name__}): the results root is not a "
                f"writable folder; set results_root=/a/writable/folder")
    return (f"could not write {path} ({type(exc).__name__}: {exc.strerror or exc}); the previous result and "
            f"checkpoints are intact: fix the cause and run the same command to resume")


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
        self.root = Path(root).expanduser().resolve()
        self.path = self.root / run_id
        self.run_id = run_id
        self.ckpt_dir = self.path / "checkpoints"
        self._lock_fd: int | None = None

    @property
    def result_path(self) -> Path:
        return self.path / "result.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "run.lock"

    @contextmanager
    def _writing(self, path: Path):
        """OSError (disk full, read-only, no permission) -> one-line `ResultsError`; the old file stays whole."""
        try:
            yield
        except OSError as exc:
            raise ResultsError(describe_write_error(path, exc, self.root)) from exc

    def create(self) -> None:
        """The run directory and `checkpoints/`, or a one-line error when the results root is not writable."""
        with self._writing(self.ckpt_dir):
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-probe.{os.getpid()}.tmp"
            probe.write_bytes(b"")
            probe.unlink()

    # --- the lock --------------------------------------------------------------------------------
    def lock(self) -> None:
        """Takes `run.lock` (flock, exclusive, non-blocking) or raises `RunLockedError` naming the holder.

        The kernel drops a flock when its process exits, however it exits, so a killed run never leaves a
        stale lock behind. The file itself stays (deleting lock files races); its content names the holder.
        """
        if self._lock_fd is not None:
            return
        with self._writing(self.lock_path):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            try:
                holder = os.read(fd, 4096).decode(errors="replace")
            finally:
                os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise ResultsError(describe_write_error(self.lock_path, exc, self.root)) from exc
            raise RunLockedError(self._locked_message(holder)) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        except OSError:
            pass  # the holder's name is a courtesy; the flock is what excludes
        self._lock_fd = fd

    def _locked_message(self, holder: str) -> str:
        try:
            info = json.loads(holder)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
            who = f"pid {info['pid']} on host {info['host']} (since {since})"
            stop = f"stop it (kill {info['pid']} on {info['host']}: it checkpoints and exits)"
        except (ValueError, KeyError, TypeError):
            who, stop = "another process (it is just starting)", "stop that process"
        return (f"run directory {self.path} is in use by {who}: the same experiment is already running there; "
                f"wait for it to finish, or {stop} and run this command again")

    def unlock(self) -> None:
        if self._lock_fd is None:
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove_stale_temporaries(self) -> list[str]:
        """Temporary files a killed writer left (`.<name>.<random>.tmp`); call only while holding the lock."""
        removed = []
        for folder in (self.path, self.ckpt_dir):
            if folder.is_dir():
                for tmp in folder.glob(".*.tmp"):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp.name)
        return removed

    # --- results ---------------------------------------------------------------------------------
    def read_result(self, warn=None) -> dict | None:
        if not self.result_path.is_file():
            return None
        try:
            return json.loads(self.result_path.read_text())
        except (ValueError, OSError) as exc:  # atomic writes make this a damaged disk or a hand edit
            if warn is not None:
                warn(f"warning: {self.result_path} is unreadable ({exc}); it will be rewritten")
            return None

    def write_result(self, result: Mapping[str, Any]) -> None:
        with self._writing(self.result_path):
            atomic_write_json(self.result_path, result)
        with self._writing(self.path / "acc_matrix.csv"):
            atomic_write_text(self.path / "acc_matrix.csv", matrix_csv(result.get("acc_matrix", [])))

    def log_event(self, event: str, **fields: Any) -> None:
        """Appends one JSON line, fsynced. A line torn by a kill or a full disk is skipped on read, and the next
        event starts on a new line."""
        line = json.dumps({"event": event, "time": time.time(), **fields}, default=_json_default)
        path = self.path / "events.jsonl"
        with self._writing(path), open(path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            torn = False
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            f.write((b"\n" if torn else b"") + line.encode() + b"\n")
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

    @property
    def partial_path(self) -> Path:
        return self.ckpt_dir / "partial.pt"

    def _save_verified(self, path: Path, state: Mapping[str, Any]) -> None:
        """`torch.save` to bytes, then the file and its sha256, each written atomically (file first: a kill in
        between leaves a file without a matching digest, which loading rejects)."""
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        data = buf.getvalue()
        with self._writing(path):
            atomic_write_bytes(path, data)
            atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")

    def save_checkpoint(self, index: int, state: Mapping[str, Any], keep: int = 2) -> Path:
        path = self.checkpoint_path(index)
        self._save_verified(path, state)
        for old in self._checkpoints()[:-keep] if keep > 0 else []:
            old.unlink(missing_ok=True)
            old.with_suffix(".sha256").unlink(missing_ok=True)
        return path

    def checkpoint_files(self) -> list[Path]:
        """The per-experience checkpoints on disk, oldest first (not necessarily valid)."""
        return sorted(self.ckpt_dir.glob("exp_*.pt")) if self.ckpt_dir.is_dir() else []

    _checkpoints = checkpoint_files

    def _load_verified(self, path: Path, warn, what: str) -> dict | None:
        """The file's content if its sha256 matches and it unpickles as plain tensors and numbers, else None
        (with a warning). `weights_only=True` refuses any other object without running its code."""
        digest_file = path.with_suffix(".sha256")
        try:
            data = path.read_bytes()
            digest = digest_file.read_text().strip() if digest_file.is_file() else None
        except OSError as exc:
            warn(f"warning: checkpoint {path.name} is unreadable ({exc.strerror or exc}); {what}")
            return None
        if digest != hashlib.sha256(data).hexdigest():
            warn(f"warning: checkpoint {path.name} is corrupt or incomplete (sha256 mismatch); {what}")
            return None
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - UnpicklingError for code or foreign objects, RuntimeError for junk
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            warn(f"warning: checkpoint {path.name} was refused: it is not plain tensors and numbers "
                 f"({type(exc).__name__}: {reason[:200]}); {what}")
            return None
        if not isinstance(state, dict):
            warn(f"warning: checkpoint {path.name} holds a {type(state).__name__}, not a checkpoint; {what}")
            return None
        return state

    def load_latest_checkpoint(self, warn=print) -> dict | None:
        """The newest checkpoint whose checksum matches; a corrupt one falls back to the previous, with a warning."""
        for path in reversed(self._checkpoints()):
            state = self._load_verified(path, warn, "falling back to the previous one")
            if state is not None:
                return state
        return None

    # --- mid-experience checkpoint ---------------------------------------------------------------
    def save_partial(self, state: Mapping[str, Any]) -> Path:
        """`checkpoints/partial.pt`: the state inside an interrupted experience (separate from `exp_XXX.pt`)."""
        self._save_verified(self.partial_path, state)
        return self.partial_path

    def load_partial(self, warn=print) -> dict | None:
        if not self.partial_path.is_file():
            return None
        return self._load_verified(self.partial_path, warn, "the interrupted experience starts over")

    def remove_partial(self) -> None:
        """Once the experience it belongs to has its own checkpoint (or it cannot be used)."""
        for path in (self.partial_path, self.partial_path.with_suffix(".sha256")):
            path.unlink(missing_ok=True)


def finished_indices(events: Iterable[Mapping[str, Any]]) -> list[int]:
    return sorted({int(e["experience"]) for e in events if e.get("event") == "experience_end"})

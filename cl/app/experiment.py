"""One run, from a composed config to `result.json`: build, resume, train, record.

This is what `run.py` calls inside Hydra; tests call `run_experiment(cfg)` directly with a config from
`compose_config` (the same composition as the command line).

Reliability (docs/architecture.md §7): one process per run directory (`run.lock`), SIGTERM/SIGINT/SIGUSR2 checkpoint
at the next step boundary and raise `RunInterrupted`, and the next start resumes from exactly there.
"""
from __future__ import annotations

import difflib
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Mapping

import torch

import scenarios
import strategies
from scenarios.datasets.imagefolder import BAD_IMAGE_POLICIES, bad_images_policy
from cl.app.registry import build_backbone
from cl.engine.errors import BackboneError, ConfigError, RunInterrupted
from cl.engine.frozen_refs import FrozenReference
from cl.engine.progress import matrix_table
from cl.engine.results import RunDir, config_hash, finished_indices
from cl.engine.trainer import History, NonFiniteLossError, Trainer, TrainerConfig, rng_state, seed_everything, set_rng_state
from cl.engine.trainer_config import check_values

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR2")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_VERSION = 1


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "torchvision", "timm", "numpy", "hydra", "omegaconf", "sklearn", "clbench"):
        try:
            out[mod] = __import__("cl" if mod == "clbench" else mod).__version__
        except Exception:  # optional or missing: recorded as absent
            out[mod] = None
    return out


def _git_commit() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip() or None
        except Exception:
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty)}


def _device_description(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "count": torch.cuda.device_count()}
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "name": cpu, "threads": torch.get_num_threads()}


def compute_metrics(history: History, kind: str) -> dict:
    """The headline metrics on the experiences finished so far (percent), as the kind's record defines them
    (cl/engine/kind_metrics.py)."""
    if len(history.acc_matrix) == 0:
        return {}
    return scenarios.get_kind(kind).compute_metrics(history)


def result_kind(result: Mapping[str, Any]) -> str:
    """The scenario kind a stored result was run with (older results too: the config always holds it)."""
    return (result.get("stream") or {}).get("kind") or result["config"]["scenario"].get("kind", "class_il")


def print_matrix(result: Mapping[str, Any], out=print) -> None:
    """The accuracy matrix, its rows and columns labelled as the kind names them."""
    rows, cols = scenarios.get_kind(result_kind(result)).labels(result)
    out(matrix_table(result["acc_matrix"], rows=rows, cols=cols))


class StopSignals:
    """SIGTERM, SIGINT and SIGUSR2 (what Slurm/submitit send before a time limit) set `pending`; the trainer
    polls it at step boundaries, checkpoints and stops. A second SIGINT (Ctrl-C twice) stops at once.

    Handlers are installed only in the main thread (Python's rule) and restored on exit. A handler that was
    installed before ours and is Python code (submitit's checkpoint-and-requeue hook) is called by `chain()`
    after the checkpoint is written.
    """

    def __init__(self) -> None:
        self.pending: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.pending is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # Ctrl-C twice: stop now; the last complete checkpoint stays
            return
        self.pending = name
        # os.write, not print: the handler may run while the main thread is inside a write to stderr.
        os.write(2, f"\n{name} received: checkpointing at the next step boundary, then stopping "
                    f"(press Ctrl-C again to stop at once)\n".encode())

    def __call__(self) -> str | None:
        return self.pending

    def chain(self) -> None:
        """Calls the pending signal's previous Python handler (e.g. submitit's requeue), if there was one."""
        if self.pending is None:
            return
        sig = getattr(signal, self.pending)
        previous = self._previous.get(sig)
        if callable(previous) and previous is not signal.default_int_handler:
            previous(sig, None)


def check_config(cfg: Mapping[str, Any]) -> TrainerConfig:
    """Everything that can be checked without reading data or building models; raises a one-line ConfigError."""
    tcfg = check_values(cfg)
    name, kind = cfg["strategy"].get("name"), cfg["scenario"].get("kind", "class_il")
    for field, value in (("strategy.name", name), ("scenario.kind", kind)):
        if not isinstance(value, str) or not value.isprintable() or not value.strip():
            raise ConfigError(f"{field} must be a name, got {value!r}")
    strategies.check_supported(name, kind)
    policy = cfg["scenario"].get("bad_images", "fail")
    if policy not in BAD_IMAGE_POLICIES:
        close = difflib.get_close_matches(str(policy), BAD_IMAGE_POLICIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown scenario.bad_images {policy!r}{hint}: expected one of "
                          f"{', '.join(BAD_IMAGE_POLICIES)} (fail stops at the first damaged image; skip drops "
                          f"them and lists them in the result's data_warnings)")
    return tcfg


def _deterministic_kernels(out) -> None:
    """`trainer.deterministic`: deterministic CUDA kernels where PyTorch has them (a warning names any op that has
    none), cuBLAS's fixed workspace, no cuDNN autotuning. See docs/architecture.md §7 for what this was measured to
    give."""
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out("warning: trainer.deterministic: CUDA is already initialised in this process, so cuBLAS may ignore "
                "CUBLAS_WORKSPACE_CONFIG; export CUBLAS_WORKSPACE_CONFIG=:4096:8 before starting Python")
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _build_backbone(cfg: Mapping[str, Any]):
    """`backbones.build`, with a weights file that is not plain tensors (a pickle with code in it, a damaged or
    foreign file) turned into a one-line `BackboneError`. `torch.load(weights_only=True)` has already refused it
    without running anything."""
    try:
        return build_backbone(cfg)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it came from reading the weights file
        if isinstance(exc, (ConfigError, BackboneError)) or not cfg.get("weights"):
            raise
        frames = {f.name for f in traceback.extract_tb(exc.__traceback__)}
        if "read_state_dict" not in frames:
            raise
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise BackboneError(
            f"weights file {cfg['weights']} could not be read as plain tensors ({type(exc).__name__}: {reason}); "
            f"nothing in it was executed: use a .safetensors file, or a torch state_dict of tensors"
        ) from None


class Run:
    """Holds what the result file describes; writes it after every experience."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.cfg = dict(cfg)
        self.run_id = config_hash(self.cfg)
        root = self.cfg.get("results_root") or "results/runs"
        self.dir = RunDir(root, self.run_id)
        self.started = time.time()
        self.meta: dict[str, Any] = {}
        self.failure: dict | None = None
        self.interruption: dict | None = None
        self.strategy_metrics: dict[str, Any] = {}  # Strategy.run_metrics() at the last finished experience

    def result(self, history: History, status: str) -> dict:
        cfg = self.cfg
        total = sum(c["wall_s"] for c in history.costs)
        return {
            "schema_version": SCHEMA_VERSION,
            "run_id": self.run_id,
            "status": status,
            "strategy": cfg["strategy"]["name"],
            "scenario": cfg["scenario"]["name"],
            "backbone": cfg["backbone"]["name"],
            "seed": cfg.get("seed"),
            "acc_matrix": history.acc_matrix,
            "task_il_matrix": history.task_il_matrix,
            "test_counts": history.test_counts,
            "initial_accuracy": history.initial_accuracy,
            "initial_task_il_accuracy": history.initial_task_il_accuracy,
            "metrics": {**compute_metrics(history, cfg["scenario"]["kind"]), **self.strategy_metrics},
            "costs": {"per_experience": history.costs, "total_wall_s": total},
            "failure": self.failure,
            "interruption": self.interruption,
            "paper": cfg.get("paper"),
            **self.meta,
            "config": cfg,
            "command": " ".join(sys.argv),
            "started": self.started,
            "updated": time.time(),
        }


def run_experiment(cfg: Mapping[str, Any], out=print) -> Path:
    """Runs (or resumes, or reloads) the experiment `cfg` describes and returns its result.json path.

    Raises `ClbenchError` (one-line message) for what the user can fix, `NonFiniteLossError`, and `RunInterrupted`
    after a stop signal (the state is checkpointed first)."""
    cfg = dict(cfg)
    tcfg = check_config(cfg)
    run = Run(cfg)
    if _reload_finished(run, out):
        return run.dir.result_path
    run.dir.create()
    run.dir.lock()  # RunLockedError when another live process runs this same experiment
    try:
        if _reload_finished(run, out):  # it finished while we waited for nothing: another process was faster
            return run.dir.result_path
        with StopSignals() as stop:
            return _run_locked(run, cfg, tcfg, stop, out)
    finally:
        run.dir.unlock()


def _reload_finished(run: Run, out) -> bool:
    previous = run.dir.read_result(warn=out)
    if previous is None or previous.get("status") != "finished":
        return False
    out(f"run {run.run_id} already finished; reloading {run.dir.result_path}")
    print_matrix(previous, out)
    _print_summary(previous, out)
    return True


def _run_locked(run: Run, cfg: dict, tcfg: TrainerConfig, stop: StopSignals, out) -> Path:
    stale = run.dir.remove_stale_temporaries()
    if stale:
        out(f"removed {len(stale)} temporary file(s) a killed process left in {run.dir.path}")
    if tcfg.deterministic:
        _deterministic_kernels(out)
    seed_everything(int(cfg["seed"]))
    data_root = cfg.get("data_root") or os.environ.get("CL_DATA") or "data"
    with bad_images_policy(cfg["scenario"].get("bad_images", "fail")) as bad_images:
        stream = scenarios.build(cfg["scenario"], data_root=data_root)
    backbone = _build_backbone(cfg["backbone"])
    strategy = strategies.build(cfg["strategy"], backbone, stream.info, trainer=tcfg)
    frozen = FrozenReference(strategy, backbone.weights_id)  # checkpoints reference what stays as built
    trainer = Trainer(tcfg, log=run.dir.log_event)
    trainer.should_stop = stop
    warnings = []
    if not backbone.pretrained:
        warnings.append(f"backbone '{backbone.name}' is randomly initialised (pretrained: false): "
                        f"its numbers are not comparable with any paper's")
        out(f"WARNING: {warnings[-1]}")
    data_warnings = bad_images.as_warnings()
    for item in data_warnings:
        warnings.append(item["message"])
        out(f"WARNING: {item['message']}")
    run.meta = {
        "pretrained": backbone.pretrained,
        "weights_id": backbone.weights_id,
        "warnings": warnings,
        "data_warnings": data_warnings,
        "stream": stream.info.to_dict(),
        "backbone_info": backbone.describe(),
        "strategy_info": dict(strategy.describe()),
        "environment": {
            "versions": _versions(),
            "git": _git_commit(),
            "device": _device_description(trainer.device),
            "hostname": socket.gethostname(),
            "precision": str(trainer.autocast_dtype or torch.float32).replace("torch.", ""),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        },
    }

    from cl.app.loggers import build as build_logger  # logger=wandb (docs/sweeps_and_leaderboard.md); None without one

    logger = build_logger(cfg.get("logger"), run.dir.path, run.run_id, cfg)
    history, start = History(), 0
    ckpt = run.dir.load_latest_checkpoint(warn=out)
    if ckpt is not None:
        strategy.load_state_dict(frozen.restore(ckpt["strategy"], ckpt.get("frozen")))
        history = History.from_state(ckpt["history"])
        set_rng_state(ckpt["rng"])
        start = int(ckpt["next_experience"])
        _recover_experience_events(run, history, start)
    partial = run.dir.load_partial(warn=out)
    if partial is not None and int(partial["experience"]) != start:
        out(f"warning: ignoring checkpoints/partial.pt: it continues experience {partial['experience']}, but the "
            f"newest valid experience checkpoint resumes at experience {start}")
        partial = None
    if partial is None:
        run.dir.remove_partial()  # stale, damaged or refused: the experience starts over
    resume = None
    if partial is not None:
        history = History.from_state(partial["history"])
        resume = dict(partial["train"])
        resume["strategy"] = frozen.restore(resume["strategy"], resume.pop("frozen", None))
        out(f"resuming run {run.run_id} inside experience {start + 1}/{len(stream)} at epoch {resume['epoch']}, "
            f"after batch {resume['batch']} (from checkpoints/partial.pt)")
        run.dir.log_event("run_resumed", next_experience=start, epoch=int(resume["epoch"]),
                          batch=int(resume["batch"]), step=int(resume["step"]))
    elif ckpt is not None:
        out(f"resuming run {run.run_id} after experience {start - 1} ({start}/{len(stream)} done)")
        run.dir.log_event("run_resumed", next_experience=start)
    else:
        run.dir.log_event("run_start", run_id=run.run_id, n_experiences=len(stream))
    out(f"run {run.run_id}: strategy={strategy.name} scenario={stream.info.name} backbone={backbone.name} "
        f"({len(stream)} experiences, {stream.info.n_classes} classes) on {trainer.device}")

    def on_experience_end(i: int, strat, hist: History) -> None:
        changed, refs = frozen.split(strat.state_dict())
        run.dir.save_checkpoint(i, {"strategy": changed, "frozen": refs, "history": hist.to_state(),
                                    "rng": rng_state(), "next_experience": i + 1}, keep=tcfg.keep_checkpoints)
        run.dir.remove_partial()  # the experience is complete: its own checkpoint supersedes the partial one
        status = "finished" if i + 1 == len(stream) else "partial"
        run.interruption = None
        run.meta["strategy_info"] = dict(strat.describe())  # what the method grew (SEMA's experts, ...) so far
        run.strategy_metrics = dict(strat.run_metrics())  # SparCL's sparsity and FLOPs
        run.dir.write_result(run.result(hist, status))
        run.dir.log_event("experience_end", experience=i, accuracy=hist.acc_matrix[-1][: i + 1],
                          wall_s=hist.costs[-1]["wall_s"])
        if logger is not None:
            logger.log_experience(i, run.dir.read_result())
        score = kind.score_line(hist, i)
        out(f"experience {i + 1}/{len(stream)}: {score}  ({hist.costs[-1]['wall_s']:.1f}s)")

    kind = scenarios.get_kind(stream.info.kind)
    trainer.on_experience_end = on_experience_end
    try:
        history = trainer.fit(stream, strategy, history=history, start=start, resume=resume)
    except NonFiniteLossError as exc:
        run.failure = {"type": "non_finite_loss", "message": str(exc), "experience": exc.experience,
                       "epoch": exc.epoch, "step": exc.step}
        run.dir.write_result(run.result(history, "failed"))
        run.dir.log_event("run_failed", **run.failure)
        raise
    except RunInterrupted as exc:
        if exc.state is not None:
            exc.state["strategy"], exc.state["frozen"] = frozen.split(exc.state["strategy"])
        _record_interruption(run, exc, history, len(stream))
        stop.chain()  # under submitit: its checkpoint-and-requeue hook, now that the state is on disk
        raise
    finally:
        if logger is not None:
            logger.finish(run.dir.read_result())
    done = len(history.acc_matrix)
    if done < len(stream):
        out(f"stopped after {done}/{len(stream)} experiences (trainer.stop_after); run the same command to resume")
        run.dir.log_event("run_stopped", finished=done)
        return run.dir.result_path
    result = run.dir.read_result()
    if result is None or result.get("status") != "finished":
        # Every experience was checkpointed but result.json is missing or damaged (the reload above refused it):
        # the last checkpoint's history holds the whole matrix and costs, so the result is rebuilt from it.
        run.meta["strategy_info"] = dict(strategy.describe())
        run.strategy_metrics = dict(strategy.run_metrics())
        run.dir.write_result(run.result(history, "finished"))
        run.dir.log_event("result_rebuilt", from_checkpoint=True)
        out(f"rebuilt {run.dir.result_path} from the checkpoints")
        result = run.dir.read_result()
    run.dir.log_event("run_end", metrics=result["metrics"])
    print_matrix(result, out)
    _print_summary(result, out)
    return run.dir.result_path


def _recover_experience_events(run: Run, history: History, start: int) -> None:
    """A SIGKILL between an experience's checkpoint and its `experience_end` line leaves the log one event short;
    the checkpoint is the truth, so the missing events are written now from its history, marked `recovered`."""
    logged = set(finished_indices(run.dir.events()))
    for i in range(min(start, len(history.acc_matrix))):
        if i not in logged:
            run.dir.log_event("experience_end", experience=i, accuracy=history.acc_matrix[i][: i + 1],
                              wall_s=history.costs[i]["wall_s"] if i < len(history.costs) else None,
                              recovered=True)


def _record_interruption(run: Run, exc: RunInterrupted, history: History, n: int) -> None:
    """Saves the mid-experience state (if the trainer stopped inside one), then the result and the event."""
    if exc.state is not None:
        path = run.dir.save_partial({"experience": exc.experience, "train": exc.state,
                                     "history": history.to_state(), "run_id": run.run_id})
        exc.checkpoint = str(path)
    elif run.dir.partial_path.is_file():  # resumed from it, then stopped again before its first step
        exc.checkpoint = str(run.dir.partial_path)
    else:
        latest = run.dir.checkpoint_files()
        exc.checkpoint = str(latest[-1]) if latest else None
    exc.state = None
    exc.run_dir = str(run.dir.path)
    exc.n_experiences = n
    run.interruption = {"signal": exc.signal_name, "experience": exc.experience, "epoch": exc.epoch,
                        "batch": exc.batch, "checkpoint": exc.checkpoint, "time": time.time()}
    run.dir.write_result(run.result(history, "interrupted"))
    run.dir.log_event("run_interrupted", **{k: v for k, v in run.interruption.items() if k != "time"},
                      finished=len(history.acc_matrix), of=n)


def _print_summary(result: Mapping[str, Any], out=print) -> None:
    m = result["metrics"]
    paper = result.get("paper") or {}
    for key, published in paper.items():  # every paper figure the run measured too, under the same key
        measured = m.get(key)
        if isinstance(published, (int, float)) and isinstance(measured, (int, float)):
            out(f"{key}: measured {measured:.2f}  paper {published:.2f}")
    out(scenarios.get_kind(result_kind(result)).summary_line(result))

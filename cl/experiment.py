"""One run, from a composed config to `result.json`: build, resume, train, record.

This is what `run.py` calls inside Hydra; tests call `run_experiment(cfg)` directly with a config from
`compose_config` (the same composition as the command line).
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

import scenarios
import strategies
from . import backbones, metrics
from .errors import ConfigError
from .progress import matrix_table
from .results import RunDir, config_hash
from .trainer import History, NonFiniteLossError, Trainer, TrainerConfig, rng_state, seed_everything, set_rng_state

PROJECT_ROOT = Path(__file__).resolve().parent.parent
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


def _square(matrix: list[list[float | None]]) -> list[list[float]]:
    k = len(matrix)
    return [[v if v is not None else float("nan") for v in row[:k]] for row in matrix]


def compute_metrics(history: History, kind: str) -> dict:
    """The headline metrics on the experiences finished so far (percent).

    Forward transfer needs `eval_future`. It is computed on the task-IL matrix for every kind (`fwt_task_il`),
    and on the class-IL matrix only for domain-IL (`fwt`): in class-IL a future experience's classes are
    masked until they are seen, so its class-IL accuracy is 0 by construction.
    """
    k = len(history.acc_matrix)
    if k == 0:
        return {}
    if kind == "tta":  # scored online, one domain at a time: the diagonal is all there is
        online = [history.acc_matrix[i][i] for i in range(k)]
        return {"online_acc_per_experience": online, "error_per_experience": [100 - a for a in online],
                "mean_error": sum(100 - a for a in online) / k}
    counts = history.test_counts[:k]
    out = metrics.summarize(_square(history.acc_matrix), counts)
    task = metrics.summarize(_square(history.task_il_matrix), counts)
    out["task_il"] = {key: task[key] for key in ("avg_incremental_acc", "last_acc", "forgetting", "bwt")}
    complete = history.initial_accuracy is not None and all(v is not None for v in history.acc_matrix[0])
    if complete and k == len(history.acc_matrix[0]):
        out["fwt_task_il"] = metrics.forward_transfer(history.task_il_matrix, history.initial_task_il_accuracy)
        if kind == "domain_il":
            out["fwt"] = metrics.forward_transfer(history.acc_matrix, history.initial_accuracy)
    return out


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
            "metrics": compute_metrics(history, cfg["scenario"]["kind"]),
            "costs": {"per_experience": history.costs, "total_wall_s": total},
            "failure": self.failure,
            "paper": cfg.get("paper"),
            **self.meta,
            "config": cfg,
            "command": " ".join(sys.argv),
            "started": self.started,
            "updated": time.time(),
        }


def run_experiment(cfg: Mapping[str, Any], out=print) -> Path:
    """Runs (or resumes, or reloads) the experiment `cfg` describes and returns its result.json path."""
    cfg = dict(cfg)
    strategies.check_supported(cfg["strategy"]["name"], cfg["scenario"]["kind"])
    tcfg = TrainerConfig.from_mapping({**cfg["trainer"]})
    run = Run(cfg)
    previous = run.dir.read_result()
    if previous is not None and previous.get("status") == "finished":
        out(f"run {run.run_id} already finished; reloading {run.dir.result_path}")
        out(matrix_table(previous["acc_matrix"]))
        _print_summary(previous, out)
        return run.dir.result_path

    run.dir.create()
    seed_everything(int(cfg["seed"]))
    data_root = cfg.get("data_root") or os.environ.get("CL_DATA") or "data"
    stream = scenarios.build(cfg["scenario"], data_root=data_root)
    backbone = backbones.build(cfg["backbone"])
    strategy = strategies.build(cfg["strategy"], backbone, stream.info)
    trainer = Trainer(tcfg, log=run.dir.log_event)
    warnings = []
    if not backbone.pretrained:
        warnings.append(f"backbone '{backbone.name}' is randomly initialised (pretrained: false): "
                        f"its numbers are not comparable with any paper's")
        out(f"WARNING: {warnings[-1]}")
    run.meta = {
        "pretrained": backbone.pretrained,
        "weights_id": backbone.weights_id,
        "warnings": warnings,
        "stream": stream.info.to_dict(),
        "backbone_info": backbone.describe(),
        "strategy_info": dict(strategy.describe()),
        "environment": {
            "versions": _versions(),
            "git": _git_commit(),
            "device": _device_description(trainer.device),
            "hostname": socket.gethostname(),
            "precision": str(trainer.autocast_dtype or torch.float32).replace("torch.", ""),
        },
    }

    history, start = History(), 0
    ckpt = run.dir.load_latest_checkpoint(warn=out)
    if ckpt is not None:
        strategy.load_state_dict(ckpt["strategy"])
        history = History.from_state(ckpt["history"])
        set_rng_state(ckpt["rng"])
        start = int(ckpt["next_experience"])
        out(f"resuming run {run.run_id} after experience {start - 1} ({start}/{len(stream)} done)")
        run.dir.log_event("run_resumed", next_experience=start)
    else:
        run.dir.log_event("run_start", run_id=run.run_id, n_experiences=len(stream))
    out(f"run {run.run_id}: strategy={strategy.name} scenario={stream.info.name} backbone={backbone.name} "
        f"({len(stream)} experiences, {stream.info.n_classes} classes) on {trainer.device}")

    def on_experience_end(i: int, strat, hist: History) -> None:
        run.dir.save_checkpoint(i, {"strategy": strat.state_dict(), "history": hist.to_state(),
                                    "rng": rng_state(), "next_experience": i + 1}, keep=tcfg.keep_checkpoints)
        status = "finished" if i + 1 == len(stream) else "partial"
        run.dir.write_result(run.result(hist, status))
        run.dir.log_event("experience_end", experience=i, accuracy=hist.acc_matrix[-1][: i + 1],
                          wall_s=hist.costs[-1]["wall_s"])
        if stream.info.kind == "tta":
            score = f"online accuracy {hist.acc_matrix[-1][i]:.2f}%"
        else:
            seen = metrics.stage_accuracies(_square(hist.acc_matrix), hist.test_counts[: len(hist.acc_matrix)])
            score = f"accuracy on seen data {seen[-1]:.2f}%"
        out(f"experience {i + 1}/{len(stream)}: {score}  ({hist.costs[-1]['wall_s']:.1f}s)")

    trainer.on_experience_end = on_experience_end
    try:
        history = trainer.fit(stream, strategy, history=history, start=start)
    except NonFiniteLossError as exc:
        run.failure = {"type": "non_finite_loss", "message": str(exc), "experience": exc.experience,
                       "epoch": exc.epoch, "step": exc.step}
        run.dir.write_result(run.result(history, "failed"))
        run.dir.log_event("run_failed", **run.failure)
        raise
    done = len(history.acc_matrix)
    if done < len(stream):
        out(f"stopped after {done}/{len(stream)} experiences (trainer.stop_after); run the same command to resume")
        run.dir.log_event("run_stopped", finished=done)
        return run.dir.result_path
    result = run.dir.read_result()
    run.dir.log_event("run_end", metrics=result["metrics"])
    out(matrix_table(history.acc_matrix))
    _print_summary(result, out)
    return run.dir.result_path


def _print_summary(result: Mapping[str, Any], out=print) -> None:
    m = result["metrics"]
    costs = result["costs"]
    paper = result.get("paper") or {}
    for key in ("avg_incremental_acc", "last_acc", "forgetting"):
        if key in paper and key in m:
            out(f"{key}: measured {m[key]:.2f}  paper {paper[key]:.2f}")
    if "mean_error" in m:
        out(f"mean online error {m['mean_error']:.2f}  wall {costs['total_wall_s']:.1f}s")
        return
    line = (f"avg incremental acc {m['avg_incremental_acc']:.2f}  last acc {m['last_acc']:.2f}  "
            f"forgetting {m['forgetting']:.2f}  bwt {m['bwt']:.2f}  "
            f"(task-IL last {m['task_il']['last_acc']:.2f})  wall {costs['total_wall_s']:.1f}s")
    out(line)

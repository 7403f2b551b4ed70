"""Experiment loggers beside `result.json` (which stays the record): today wandb, selected with `logger=wandb`.

Why a module: `run_experiment` only calls `build(cfg, run_dir)`, `log_experience(i, result)` and `finish(result)`;
what a tracker wants lives here. A logger never changes what is computed, so `logger` is left out of the run's hash.

wandb is offline unless configured: the mode is `logger.mode` if set, else `WANDB_MODE` if set, else `online` when
a project is named (`logger.project` or `WANDB_PROJECT`), else `offline`. Offline runs write
`<run dir>/wandb/offline-run-*` and send nothing; `wandb sync <that folder>` uploads one later.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from cl.engine.errors import ConfigError, MissingExtraError

LOGGERS = ("wandb",)


def build(cfg: Mapping[str, Any] | None, run_dir: Path, run_id: str, config: Mapping[str, Any]):
    """The logger `cfg` names (None when there is no `logger` section or its name is null)."""
    if not cfg or not cfg.get("name"):
        return None
    if cfg["name"] != "wandb":
        raise ConfigError(f"unknown logger {cfg['name']!r}: expected one of {', '.join(LOGGERS)} (logger=wandb)")
    return WandbLogger(cfg, run_dir, run_id, config)


def wandb_mode(cfg: Mapping[str, Any]) -> str:
    """offline unless configured (see the module docstring)."""
    mode = cfg.get("mode") or os.environ.get("WANDB_MODE")
    if not mode:
        mode = "online" if (cfg.get("project") or os.environ.get("WANDB_PROJECT")) else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"logger.mode must be online, offline or disabled, got {mode!r} (from logger.mode or "
                          f"WANDB_MODE)")
    return mode


class WandbLogger:
    """One wandb run per clbench run, with the run id as wandb id: a resumed (requeued) run continues it."""

    def __init__(self, cfg: Mapping[str, Any], run_dir: Path, run_id: str, config: Mapping[str, Any]):
        try:
            import wandb
        except ImportError:
            raise MissingExtraError("wandb", "wandb") from None
        self.wandb = wandb
        self.mode = wandb_mode(cfg)
        folder = Path(cfg.get("dir") or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=not cfg.get("system_stats", False))
        self.run = wandb.init(project=cfg.get("project") or os.environ.get("WANDB_PROJECT") or "clbench",
                              entity=cfg.get("entity"), group=cfg.get("group"), tags=list(cfg.get("tags") or []),
                              mode=self.mode, dir=str(folder), id=run_id, name=run_id, resume="allow",
                              config=dict(config), settings=settings)

    def log_experience(self, i: int, result: Mapping[str, Any]) -> None:
        """After experience i: its accuracy row, the headline metrics so far and the experience's costs."""
        row = result["acc_matrix"][i]
        seen = [v for v in row[: i + 1] if v is not None]
        data: dict[str, Any] = {"experience": i, "acc_seen": sum(seen) / len(seen) if seen else None}
        data.update({f"acc/exp_{j}": v for j, v in enumerate(row[: i + 1]) if v is not None})
        data.update({f"metrics/{k}": v for k, v in (result.get("metrics") or {}).items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
        costs = (result.get("costs") or {}).get("per_experience") or []
        if i < len(costs):
            data.update({f"costs/{k}": v for k, v in costs[i].items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
        self.run.log(data, step=i)

    def finish(self, result: Mapping[str, Any] | None) -> None:
        """The accuracy matrix as a table, the metrics as the run summary, the status; then close the run."""
        if result is not None:
            matrix = result.get("acc_matrix") or []
            n = max((len(r) for r in matrix), default=0)
            table = self.wandb.Table(columns=["trained_on"] + [f"exp_{j}" for j in range(n)],
                                     data=[[i] + list(r) + [None] * (n - len(r)) for i, r in enumerate(matrix)])
            self.run.log({"acc_matrix": table})
            for k, v in (result.get("metrics") or {}).items():
                self.run.summary[k] = v
            self.run.summary["status"] = result.get("status")
        self.run.finish(exit_code=0 if result is not None and result.get("status") in ("finished", "partial") else 1)

"""clbench: one command runs a continual-learning stream end to end (`clbench`, `python -m cl`, `python run.py`).

    clbench                                         # the embedded default (digits, no downloads)
    clbench strategy=simplecil scenario=synthetic seed=1
    clbench -m strategy=finetune,joint,simplecil debug=fast

Exit codes: 0 done; 2 a one-line `error: ...` the user can fix (config, data, weights, results root, lock, disk,
non-finite loss); 75 interrupted by SIGTERM/SIGINT/SIGUSR2 after checkpointing (run the same command to resume).
The module is named `run` because Hydra names the job after it (`hydra.job.name`, the `run.log` file), as when
`run.py` held this code.
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cl.app import plugins
from cl.app.cli import CONFIG_DIR, check_group_overrides, explain_config_error, fail, is_config_error


class _TaskError(Exception):
    """Wraps an exception raised inside `task` so it is not mistaken for a composition error."""


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def task(cfg: DictConfig) -> None:
    try:
        _task(cfg)
    except Exception as exc:  # noqa: BLE001 - unwrapped again in main, traceback intact
        raise _TaskError() from exc


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl.engine.errors import EXIT_INTERRUPTED, ClbenchError, ConfigError, NonFiniteLossError, RunInterrupted
    from cl.engine.trainer_config import check_values

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except Exception as exc:  # noqa: BLE001
        if not is_config_error(exc):
            raise
        container, message = None, explain_config_error(exc, sys.argv[1:])
    try:
        if container is None:
            raise ConfigError(message)
        check_values(container)  # every value error before torch, timm and the strategies are imported
        from cl.app.experiment import run_experiment

        path = run_experiment(container)
    except RunInterrupted as exc:
        # Stop the whole sweep too: the signal was meant for this process.
        print(f"interrupted: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    except (ClbenchError, NonFiniteLossError) as exc:
        if not multirun:
            fail(str(exc))
        # In a sweep one bad job must not stop the others: report and go on.
        print(f"error: {exc}", file=sys.stderr)
        return
    print(f"result: {path}", flush=True)


def _compare() -> None:
    """No arguments at all: the comparison of configs/config.yaml's `compare` list (cl/app/compare.py), with the
    same exit codes. Returns only when the list is empty (then the single default run follows)."""
    from cl.app.compare import main as compare
    from cl.engine.errors import EXIT_INTERRUPTED, ClbenchError, NonFiniteLossError, RunInterrupted

    try:
        done = compare()
    except RunInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED)
    except (ClbenchError, NonFiniteLossError) as exc:
        fail(str(exc))
    if done:
        raise SystemExit(0)


def main() -> None:
    """The command line: `sys.argv[1:]` are Hydra overrides and flags, exactly as `python run.py` takes them; with
    none at all, the embedded comparison."""
    if len(sys.argv) == 1:
        plugins.register_config_search_path()
        _compare()
    problem = check_group_overrides(sys.argv[1:])
    if problem:
        fail(problem)
    plugins.register_config_search_path()  # installed plugins' and $CLBENCH_CONFIG_PATH's config folders
    # Hydra then raises its composition errors instead of printing several lines and exiting 1; they become one
    # `error:` line below. Errors from the run itself keep their traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task()
    except _TaskError as wrapped:
        raise wrapped.__cause__ from None
    except Exception as exc:  # noqa: BLE001
        if not is_config_error(exc):
            raise
        fail(explain_config_error(exc, [a for a in sys.argv[1:] if not a.startswith("-")]))


if __name__ == "__main__":
    main()

"""clbench: one command runs a continual-learning stream end to end.

    python run.py                                   # the embedded default (digits, no downloads)
    python run.py strategy=simplecil scenario=synthetic seed=1
    python run.py -m strategy=finetune,joint,simplecil debug=fast

Exit codes: 0 done; 2 a one-line `error: ...` the user can fix (config, data, weights, results root, lock, disk,
non-finite loss); 75 interrupted by SIGTERM/SIGINT/SIGUSR2 after checkpointing (run the same command to resume).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cl.cli import check_group_overrides, explain_config_error, fail, is_config_error


class _TaskError(Exception):
    """Wraps an exception raised inside `main` so it is not mistaken for a composition error."""


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        _main(cfg)
    except Exception as exc:  # noqa: BLE001 - unwrapped again in __main__, traceback intact
        raise _TaskError() from exc


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl.errors import EXIT_INTERRUPTED, ClbenchError, ConfigError, NonFiniteLossError, RunInterrupted
    from cl.trainer_config import check_values

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
        from cl.experiment import run_experiment

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


if __name__ == "__main__":
    problem = check_group_overrides(sys.argv[1:])
    if problem:
        fail(problem)
    # Hydra then raises its composition errors instead of printing several lines and exiting 1; they become one
    # `error:` line below. Errors from the run itself keep their traceback.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except _TaskError as wrapped:
        raise wrapped.__cause__ from None
    except Exception as exc:  # noqa: BLE001
        if not is_config_error(exc):
            raise
        fail(explain_config_error(exc, [a for a in sys.argv[1:] if not a.startswith("-")]))

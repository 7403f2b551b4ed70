"""clbench: one command runs a continual-learning stream end to end.

    python run.py                                   # the embedded default (digits, no downloads)
    python run.py strategy=simplecil scenario=synthetic seed=1
    python run.py -m strategy=finetune,joint,simplecil debug=fast
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from cl.cli import check_group_overrides, fail, normalize_overrides


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from cl.errors import ClbenchError
    from cl.experiment import run_experiment
    from cl.trainer import NonFiniteLossError

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    container = OmegaConf.to_container(cfg, resolve=True)
    try:
        path = run_experiment(container)
    except (ClbenchError, NonFiniteLossError) as exc:
        if not multirun:
            fail(str(exc))
        # In a sweep one bad job must not stop the others: report and go on.
        print(f"error: {exc}", file=sys.stderr)
        return
    print(f"result: {path}", flush=True)


if __name__ == "__main__":
    sys.argv[1:] = normalize_overrides(sys.argv[1:])
    problem = check_group_overrides(sys.argv[1:])
    if problem:
        fail(problem)
    main()

"""Errors a user can fix. `run.py` prints them as one `error: ...` line (plus a tree, for data) and no traceback.

Exit codes of `python run.py` (documented in docs/architecture.md §7):
    0   finished (or stopped by `trainer.stop_after`, or reloaded)
    2   a `ClbenchError` or a non-finite loss: one `error: ...` line on stderr, nothing half-written
    75  interrupted by SIGTERM, SIGINT or SIGUSR2: the state was checkpointed; the same command resumes
        (75 is sysexits' EX_TEMPFAIL, "temporary failure, retry")
"""

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 75


class ClbenchError(Exception):
    """Base class: the message names the fix."""


class ConfigError(ClbenchError):
    """Unknown name, unsupported combination, invalid value."""


class DatasetError(ClbenchError):
    """A dataset is missing or incomplete; the message shows the expected layout and where the data comes from."""


class BackboneError(ClbenchError):
    """Weights missing or not matching the architecture."""


class MissingExtraError(ClbenchError):
    """An optional dependency is not installed."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"this feature needs '{package}': install it with  pip install -e .[{extra}]")


class ResultsError(ClbenchError):
    """The run directory cannot be written (not writable, disk full) or is in use by another process."""


class RunLockedError(ResultsError):
    """Another live process holds the run directory's lock."""


class RunInterrupted(Exception):
    """A stop signal arrived; the run checkpointed at a step boundary and stops. Not an error: exit code 75.

    The trainer raises it with `state` (what a mid-experience checkpoint needs); `run_experiment` saves that
    state, fills in `checkpoint`, drops `state` and re-raises it to the caller.
    """

    def __init__(self, signal_name: str, experience: int, epoch: int | None = None, batch: int | None = None,
                 state: dict | None = None, phase: str | None = None):
        self.signal_name, self.experience, self.epoch, self.batch = signal_name, experience, epoch, batch
        self.state = state
        self.phase = phase  # a pass outside the SGD steps (statistics, evaluation, ...): the experience restarts
        self.checkpoint: str | None = None
        self.run_dir: str | None = None
        super().__init__(signal_name)

    n_experiences: int | None = None

    def __str__(self) -> str:
        of = f"/{self.n_experiences}" if self.n_experiences else ""
        if self.epoch is not None:
            where = f"in experience {self.experience + 1}{of} (index {self.experience}), epoch {self.epoch}, " \
                    f"after batch {self.batch}"
        elif self.phase is not None:
            where = f"in experience {self.experience + 1}{of} (index {self.experience}) during {self.phase}, which " \
                    f"restarts from the experience's beginning"
        else:
            where = f"before experience {self.experience + 1}{of} (index {self.experience})"
        saved = f"state saved to {self.checkpoint}" if self.checkpoint else "nothing to save yet"
        return f"interrupted by {self.signal_name} {where}: {saved}; run the same command to resume"


class NonFiniteLossError(RuntimeError):
    """A loss turned NaN/inf: the run stops, keeps every finished experience and records the failure."""

    def __init__(self, experience: int, epoch: int, step: int, value: float, every: int = 1):
        seen = (f" (the loss is read back every {every} steps: it turned non-finite at most {every - 1} steps earlier)"
                if every > 1 else "")
        super().__init__(f"non-finite loss ({value}) at experience {experience}, epoch {epoch}, step {step}{seen}: "
                         f"lower the learning rate or enable trainer.clip_grad_norm")
        self.experience, self.epoch, self.step = experience, epoch, step

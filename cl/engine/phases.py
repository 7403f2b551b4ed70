"""The trainer's optimisation routine, handed to strategies that optimise in several phases (DESIGN.md,
"Strategies"): SEMA's functional and representation-descriptor phases, MOS's classifier alignment.

A strategy never writes its own optimisation loop and never imports `cl.engine.trainer`: the trainer sets
`strategy.optimise` (an `Optimiser`) before each experience's training and end-of-experience passes, and the
strategy runs each phase through it:

    self.optimise.phase(step, data, params=..., epochs=..., lr=..., desc="exp 2 rd")

`step(batch) -> loss` is the phase's forward; the routine owns what the trainer's SGD loop owns: the optimiser and
its per-epoch schedule (from the trainer config, any field overridable per phase), autocast as the trainer sets it,
zero_grad / backward / gradient clipping / step, the loss read back every `log_every` steps with the non-finite
check (`NonFiniteLossError`), `limit_train_batches`, a progress bar, and the run's stop check before every step
(a pending SIGTERM raises `RunInterrupted(phase=desc)`; the experience then restarts from its checkpoint, as for
every pass outside the SGD steps: cl/engine/progress.py).
"""
from __future__ import annotations

import dataclasses
import math
from contextlib import nullcontext
from typing import Any, Callable, Iterable

import torch

from cl.engine.errors import NonFiniteLossError
from cl.engine.progress import check_stop, phase_bar
from cl.engine.trainer_config import TrainerConfig


class _FromTrainer:
    """The default of every per-phase override: the trainer config's value."""

    def __repr__(self) -> str:
        return "TRAINER"


TRAINER: Any = _FromTrainer()
# What a phase may override: the trainer config's optimisation fields.
PHASE_FIELDS = ("epochs", "optimizer", "lr", "momentum", "weight_decay", "scheduler", "min_lr", "milestones",
                "gamma", "clip_grad_norm", "limit_train_batches")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 for `bf16`, and for `auto` on CUDA; None (fp32) otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def build_optimizer(groups: list, c: TrainerConfig) -> torch.optim.Optimizer:
    """`c.optimizer` over `groups` at `c.lr` (a group's own `lr` wins), with the config's momentum and decay."""
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
    cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=c.lr, weight_decay=c.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, c: TrainerConfig):
    """The per-epoch lr schedule (stepped after every epoch): cosine to `min_lr` over `epochs`; multistep, lr
    times `gamma` after each epoch in `milestones` (torch MultiStepLR, as FSA's cil_trainer.py:36-39); constant:
    none."""
    if c.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs, eta_min=c.min_lr)
    if c.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(c.milestones), gamma=c.gamma)
    return None


class Optimiser:
    """Runs optimisation phases with the trainer's machinery (module docstring). `cfg`: the trainer config;
    `experience`: the index a non-finite loss is reported for."""

    def __init__(self, cfg: TrainerConfig, device: torch.device | str, experience: int = 0):
        self.cfg = cfg
        self.device = torch.device(device)
        self.experience = int(experience)

    def settings(self, **overrides: Any) -> TrainerConfig:
        """The trainer config with this phase's overrides (those left at `TRAINER` keep the trainer's value)."""
        given = {k: v for k, v in overrides.items() if v is not TRAINER}
        unknown = sorted(set(given) - set(PHASE_FIELDS))
        if unknown:
            raise TypeError(f"a phase cannot override {unknown[0]!r}: only {', '.join(PHASE_FIELDS)}")
        return dataclasses.replace(self.cfg, **given)

    def autocast(self, enabled: bool = True):
        """The trainer's autocast (trainer.precision); a no-op when `enabled` is false."""
        dtype = autocast_dtype(self.cfg.precision, self.device) if enabled else None
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def make_optimizer(self, params: Iterable[Any], **overrides: Any):
        """(optimiser, per-epoch scheduler or None) over `params` from the trainer config and `overrides`."""
        c = self.settings(**overrides)
        opt = build_optimizer(list(params), c)
        return opt, make_scheduler(opt, c)

    def phase(self, step: Callable[[Any], torch.Tensor], data: Iterable[Any] | Callable[[int], Iterable[Any]], *,
              params: Iterable[Any] | None = None, opt: torch.optim.Optimizer | None = None,
              sched: Any = None, desc: str = "phase", autocast: bool = True,
              before_step: Callable[[], None] | None = None, after_step: Callable[[], None] | None = None,
              **overrides: Any) -> float | None:
        """`epochs` epochs of: for each batch of `data` (a re-iterable such as a loader, or `epoch -> batches` for
        data drawn anew every epoch), `loss = step(batch)` under autocast, then zero_grad, backward,
        `before_step`, clipping, `opt.step()`, `after_step`; `sched` steps after every epoch.

        `opt` (and `sched`) given: those are stepped; else both are built from `params` and the trainer
        config with `overrides` (`lr`, `epochs`, `optimizer`, `momentum`, `weight_decay`, `scheduler`, `min_lr`,
        ...; `limit_train_batches=None` lifts the trainer's cap). Returns the last epoch's mean loss (None if
        nothing ran)."""
        c = self.settings(**overrides)
        if c.epochs <= 0:
            return None
        if opt is None:
            params = list(params or [])
            if not params:
                return None
            opt = build_optimizer(params, c)
            sched = make_scheduler(opt, c)
        clip = [p for g in opt.param_groups for p in g["params"]] if c.clip_grad_norm else None
        per_epoch = _length(data)
        if per_epoch is not None and c.limit_train_batches is not None:
            per_epoch = min(per_epoch, c.limit_train_batches)
        bar = phase_bar(c.epochs * per_epoch if per_epoch is not None else None, desc, enabled=self.cfg.progress)
        # A watched loader (cl/engine/data.py) would poll and draw a second bar: this loop does both, once per step.
        watched = getattr(data, "desc", None)
        if watched is not None:
            data.desc = None
        step_no, mean = 0, None
        try:
            for epoch in range(c.epochs):
                batches = data(epoch) if callable(data) else data
                running, count = torch.zeros((), device=self.device), 0
                for b, batch in enumerate(batches):
                    # As the trainer's loop: the batch past the cap is fetched (its sampling draws), then dropped.
                    if c.limit_train_batches is not None and b >= c.limit_train_batches:
                        break
                    check_stop(desc)
                    with self.autocast(autocast):
                        loss = step(batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if before_step is not None:
                        before_step()
                    if clip:
                        torch.nn.utils.clip_grad_norm_(clip, c.clip_grad_norm)
                    opt.step()
                    if after_step is not None:
                        after_step()
                    running += loss.detach().float()
                    count += 1
                    step_no += 1
                    bar.update(1)
                    if step_no % c.log_every == 0:
                        mean = self._read_back(running, count, epoch, step_no, c, bar)  # host sync: every log_every
                if count:
                    mean = self._read_back(running, count, epoch, step_no, c, bar)  # and at the end of the epoch
                if sched is not None:
                    sched.step()
        finally:
            if watched is not None:
                data.desc = watched
            bar.close()
        return mean

    def _read_back(self, running, count, epoch, step_no, c, bar) -> float:
        mean = (running / count).item()
        if not math.isfinite(mean):
            raise NonFiniteLossError(self.experience, epoch, step_no, mean, every=c.log_every)
        bar.set_postfix(epoch=f"{epoch + 1}/{c.epochs}", loss=f"{mean:.4f}")
        return mean


def _length(data) -> int | None:
    if callable(data):
        return None
    try:
        return len(data)
    except TypeError:
        return None

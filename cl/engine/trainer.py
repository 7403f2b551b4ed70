"""The loop over experiences. It owns optimisation, precision, evaluation, costs and checkpoints, and
calls the strategy's hooks (cl/engine/strategy.py) so that no method needs a trainer change.

Per experience i:
    strategy.observe_classes(exp); groups = strategy.begin_experience(exp)
    the loop the stream's protocol declares (`stream.protocol`, cl/engine/kinds.py):
      sgd:    SGD epochs over strategy.training_data(stream[:i+1])  (or strategy.fit_experience, whose
              optimisation phases run through strategy.optimise: cl/engine/phases.py, set before each experience)
              strategy.end_experience(exp, loader)
              evaluate what the protocol scores (the seen experiences, or its fixed groups) in one pass over the
              union of their test sets, then split per experience
      online: predict-then-adapt over the experience's test batches (cl/engine/online.py)
    checkpoint, then the `experience_end` event (a kill between the two is repaired on resume: cl/app/experiment.py)

The trainer knows no scenario kind: what differs between kinds is declared in the protocol.

Interruption: `Trainer.should_stop()` (set by `run_experiment` from its signal handlers) is polled before each
experience and after each optimiser step. When it names a signal, the trainer raises `RunInterrupted`; inside the
SGD loop the exception carries the state a mid-experience checkpoint needs (`_TrainPosition`), and
`fit(..., resume=that state)` continues from exactly there: same epoch, the same seeded batch order with the consumed
batches skipped, optimiser, scheduler and RNG states restored.
"""
from __future__ import annotations

import math
import random
import resource
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from cl.engine.cache import model_input  # to_model_input, plus the image cache's device-side augmentation
from cl.engine.data import WithExtras, make_loader, to_model_input, unit_float
from cl.engine.errors import ConfigError, NonFiniteLossError, RunInterrupted  # noqa: F401  (re-exported)
from cl.engine.feature_cache import FeatureCache
from cl.engine.online import ExperienceOutcome, OnlineLoop
from cl.engine.phases import Optimiser, build_optimizer, make_scheduler  # noqa: F401  (make_scheduler re-exported)
from cl.engine.progress import progress_bar, set_experience, stop_checks
from cl.engine.strategy import Batch, Strategy
from cl.engine.stream import Stream
from cl.engine.trainer_config import OPTIMIZERS, PRECISIONS, SCHEDULERS, TrainerConfig  # noqa: F401  (re-exported)

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer.device asks for CUDA but no GPU is visible: use trainer.device=cpu")
    return torch.device(name)


# --- RNG state as plain tensors (checkpoints are loaded with weights_only=True) -------------------
def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": torch.tensor(random.getstate()[1], dtype=torch.int64),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is in KiB on Linux: the process's high-water mark, not per experience.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


@dataclass
class History:
    """Everything the trainer has measured so far; saved in every checkpoint."""

    acc_matrix: list[list[float | None]] = field(default_factory=list)
    task_il_matrix: list[list[float | None]] = field(default_factory=list)
    test_counts: list[int] = field(default_factory=list)
    # Accuracy of the untrained model on every experience (the FWT baseline b_j), when eval_future is on:
    # class-IL over all classes, and task-IL within each experience's classes.
    initial_accuracy: list[float] | None = None
    initial_task_il_accuracy: list[float] | None = None
    costs: list[dict] = field(default_factory=list)

    def to_state(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "History":
        return cls(**{k: state[k] for k in cls.__dataclass_fields__ if k in state})


class Trainer:
    def __init__(self, cfg: TrainerConfig, *, on_experience_end: Callable[..., None] | None = None,
                 log: Callable[..., None] | None = None):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.on_experience_end = on_experience_end
        self.log = log or (lambda event, **kw: None)
        # Polled at step and experience boundaries; returns the name of a pending stop signal, or None.
        self.should_stop: Callable[[], str | None] = lambda: None

    # --- precision -----------------------------------------------------------------------------
    @property
    def autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "bf16" or (p == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def autocast(self):
        dtype = self.autocast_dtype
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    # --- the loop --------------------------------------------------------------------------------
    def fit(self, stream: Stream, strategy: Strategy, history: History | None = None, start: int = 0,
            resume: Mapping[str, Any] | None = None) -> History:
        """Trains and evaluates experiences `start..`; `resume` (the `state` of a `RunInterrupted` raised inside
        experience `start`) continues that experience from its step instead of from its beginning."""
        history = history or History()
        if resume is not None and int(resume["experience"]) != start:
            raise ValueError(f"a mid-experience state for experience {resume['experience']} cannot resume at {start}")
        strategy.to(self.device)
        strategy.feature_cache = (FeatureCache(self.device, self.cfg.eval_batch_size, self.autocast_dtype)
                                  if self.cfg.feature_cache else None)
        n = len(stream)
        # eval_initial (declared by the stream's protocol, e.g. forgetting): the untouched model is a reference
        if (self.cfg.eval_future or stream.protocol.eval_initial) and history.initial_accuracy is None:
            row, task_row, counts = self.evaluate(stream, strategy, upto=n - 1, mask_to_seen=False)
            history.initial_accuracy, history.initial_task_il_accuracy = row, task_row
            history.test_counts = counts
        stop_at = n if self.cfg.stop_after is None else min(n, start + self.cfg.stop_after)
        with stop_checks(self.should_stop, enabled=self.cfg.progress):
            return self._fit_experiences(stream, strategy, history, start, stop_at, resume)

    def _fit_experiences(self, stream: Stream, strategy: Strategy, history: History, start: int, stop_at: int,
                         resume: Mapping[str, Any] | None) -> History:
        n = len(stream)
        for i in range(start, stop_at):
            set_experience(i)
            signal_name = self.should_stop()
            if signal_name:
                raise RunInterrupted(signal_name, experience=i)
            exp = stream[i]
            here = resume if i == start else None
            self.log("experience_start", experience=i, classes=list(exp.classes),
                     **({"resumed_at": {"epoch": int(here["epoch"]), "batch": int(here["batch"])}} if here else {}))
            t0 = time.perf_counter() - (float(here["wall_s"]) if here else 0.0)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            strategy.observe_classes(exp)
            groups = normalize_groups(strategy.begin_experience(exp))
            strategy.to(self.device)
            # the loop the stream's protocol declares: train then evaluate, or predict-then-adapt online
            if stream.protocol.loop == "online":
                out = OnlineLoop(self).run(stream, strategy, i, count_trainable(groups))
            else:
                out = self._learn_and_evaluate(stream, strategy, groups, i, here, t0)
            row, task_row, counts = out.row, out.task_row, out.counts
            history.acc_matrix.append(_pad(row, n))
            history.task_il_matrix.append(_pad(task_row, n))
            if len(counts) > len(history.test_counts):
                history.test_counts = counts
            mem, mem_kind = peak_memory_mb(self.device)
            n_eval = sum(counts)
            history.costs.append({
                "experience": i,
                "wall_s": time.perf_counter() - t0,
                "train_s": out.train_s,
                "eval_s": out.eval_s,
                "train_images": out.train_images,
                "train_images_per_s": out.train_images / out.train_s if out.train_s > 0 else None,
                "eval_images_per_s": n_eval / out.eval_s if out.eval_s > 0 else None,
                **out.extra_costs,  # the online loop's adapt time and per-batch figures
                "forward_passes_per_test_image": strategy.forward_passes_per_test_image,
                "peak_memory_mb": mem,
                "peak_memory_kind": mem_kind,
                "trainable_params": out.trainable,
                "added_params": strategy.added_params(),
            })
            if self.on_experience_end is not None:
                self.on_experience_end(i, strategy, history)
        return history

    def _learn_and_evaluate(self, stream: Stream, strategy: Strategy, groups: list, i: int,
                            resume: Mapping[str, Any] | None, t0: float) -> ExperienceOutcome:
        """The `sgd` loop's experience: the training phase, then one evaluation pass over what the protocol scores."""
        trainable = count_trainable(groups)  # before training: strategies freeze what they trained
        train_time, train_images = self._learn(stream, strategy, groups, i, resume, t0)
        trained = strategy.trained_param_count()  # a strategy that grows modules while training knows
        trainable = trained if trained is not None else trainable
        upto = len(stream) - 1 if self.cfg.eval_future else i
        t = time.perf_counter()
        row, task_row, counts = self.evaluate(stream, strategy, upto=upto)
        return ExperienceOutcome(row, task_row, counts, train_s=train_time, train_images=train_images,
                                 eval_s=time.perf_counter() - t, trainable=trainable)

    def _learn(self, stream: Stream, strategy: Strategy, groups: list, i: int,
               resume: Mapping[str, Any] | None = None, t0: float = 0.0) -> tuple[float, int]:
        """The training phase of experience i: SGD epochs, or the strategy's own fit; then end_experience."""
        exp = stream[i]
        # The optimisation routine a strategy runs its own phases through (cl/engine/phases.py; SEMA, MOS's alignment).
        strategy.optimise = Optimiser(self.cfg, self.device, experience=i)
        train_data = strategy.training_data(stream[: i + 1])
        if strategy.needs_index or strategy.needs_raw_input:  # Batch.index / Batch.raw, only when asked for
            train_data = WithExtras(train_data, index=strategy.needs_index, raw=strategy.needs_raw_input)
        # A last batch of one sample cannot pass a BatchNorm in training mode (torch refuses it: `python run.py
        # seed=1` on digits hit this); such a batch is dropped, as most training scripts' drop_last would.
        lone_tail = (strategy.uses_sgd and len(train_data) % self.cfg.batch_size == 1
                     and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in strategy.modules()))
        loader = make_loader(train_data, batch_size=self.cfg.batch_size, shuffle=True,
                             seed=self.cfg.seed * 1000 + i, num_workers=self.cfg.num_workers,
                             pin_memory=self.device.type == "cuda", drop_last=strategy.drop_last or lone_tail)
        if strategy.uses_sgd:
            loader.desc = None  # the SGD loop has its own bar and stop checks (with a resumable position)
            task_id = exp.task_id if stream.protocol.task_ids else None  # task-IL: batches carry the task id
            train_time, train_images = self._train_sgd(strategy, groups, loader, i, len(stream), task_id,
                                                       resume=resume, t0=t0)
        else:
            loader.desc = f"{strategy.name}: fit experience {i + 1}"
            t = time.perf_counter()
            strategy.fit_experience(exp, loader, self.device)
            train_time, train_images = time.perf_counter() - t, len(train_data)
        loader.desc = f"{strategy.name}: end of experience {i + 1}"  # prototypes, statistics, merges
        strategy.end_experience(exp, loader)
        return train_time, train_images

    def _make_optimizer(self, strategy: Strategy, groups: list) -> torch.optim.Optimizer | None:
        custom = strategy.configure_optimizer(groups)
        if custom is not None:
            return custom
        if not groups or count_trainable(groups) == 0:
            return None
        c = self.cfg
        # A group may ask for a multiple of the configured lr (MOS trains its head at 0.1x the adapter lr).
        groups = [{**{k: v for k, v in g.items() if k != "lr_scale"}, "lr": c.lr * g["lr_scale"]}
                  if isinstance(g, dict) and "lr_scale" in g else g for g in groups]
        return build_optimizer(groups, c)

    def _train_sgd(self, strategy: Strategy, groups: list, loader, index: int, n_exp: int, task_id: int,
                   resume: Mapping[str, Any] | None = None, t0: float = 0.0) -> tuple[float, int]:
        c = self.cfg
        optimizer = self._make_optimizer(strategy, groups)
        if optimizer is None:
            return 0.0, 0
        scheduler = make_scheduler(optimizer, c)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        steps_per_epoch = len(loader) if c.limit_train_batches is None else min(len(loader), c.limit_train_batches)
        bar = progress_bar(total=c.epochs * steps_per_epoch, desc=f"exp {index + 1}/{n_exp}", enabled=c.progress)
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        strategy.train()
        images, train_time, step = 0, 0.0, 0
        first_epoch = 0
        if resume is not None:
            first_epoch = int(resume["epoch"])
            images, train_time, step = int(resume["images"]), float(resume["train_s"]), int(resume["step"])
            bar.update(step)
        generator = loader.generator
        for epoch in range(first_epoch, c.epochs):
            strategy.begin_epoch(epoch, c.epochs)
            running, count = torch.zeros((), device=self.device), 0
            skip = 0
            if resume is not None:
                # Back to the seeded order of this epoch, past the batches already trained on, then the exact
                # state after the last of them (the RNG last: skipping may draw augmentations).
                if generator is not None and resume.get("loader_generator") is not None:
                    generator.set_state(resume["loader_generator"])
                skip = int(resume["batch"])
                running += float(resume["running_loss"])
                count = int(resume["count"])
            epoch_order = generator.get_state() if generator is not None else None
            t_epoch = time.perf_counter()
            batches = iter(loader)
            if resume is not None:
                _skip_batches(batches, skip)
                strategy.load_state_dict(resume["strategy"])
                optimizer.load_state_dict(resume["optimizer"])
                if scheduler is not None and resume.get("scheduler") is not None:
                    scheduler.load_state_dict(resume["scheduler"])
                set_rng_state(resume["rng"])
                strategy.train()
                resume = None
            for b, (x, y, *extras) in enumerate(batches, start=skip):
                if b >= steps_per_epoch:
                    break
                batch = Batch(model_input(x, size, chans, self.device), y.to(self.device, non_blocking=True),
                              self._task_ids(task_id, len(y)))
                if extras:  # WithExtras: what the strategy asked for
                    if "index" in extras[0]:
                        batch.index = extras[0]["index"].to(self.device, non_blocking=True)
                    if "raw" in extras[0]:
                        batch.raw = unit_float(extras[0]["raw"], self.device)
                with self.autocast():
                    loss = strategy.train_step(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                strategy.before_optimizer_step()
                if c.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, c.clip_grad_norm)
                optimizer.step()
                strategy.after_optimizer_step()
                running += loss.detach().float()
                count += 1
                images += len(y)
                step += 1
                bar.update(1)
                if step % c.log_every == 0 or b == steps_per_epoch - 1:
                    mean = (running / count).item()  # the only host sync, every log_every steps
                    if not math.isfinite(mean):
                        bar.close()
                        raise NonFiniteLossError(index, epoch, step, mean, every=c.log_every)
                    elapsed = train_time + time.perf_counter() - t_epoch
                    bar.set_postfix(epoch=f"{epoch + 1}/{c.epochs}", loss=f"{mean:.4f}",
                                    img_s=f"{images / max(elapsed, 1e-9):.0f}")
                signal_name = self.should_stop()
                if signal_name:
                    bar.close()
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    state = {
                        "experience": index, "epoch": epoch, "batch": b + 1, "step": step, "images": images,
                        "count": count, "running_loss": float(running.item()),
                        "train_s": train_time + now - t_epoch, "wall_s": now - t0,
                        "loader_generator": epoch_order,
                        "strategy": strategy.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rng": rng_state(),
                    }
                    raise RunInterrupted(signal_name, experience=index, epoch=epoch, batch=b + 1, state=state)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_time += time.perf_counter() - t_epoch
            epoch_loss = (running / max(count, 1)).item()
            self.log("epoch_end", experience=index, epoch=epoch, loss=epoch_loss,
                     lr=optimizer.param_groups[0]["lr"], images_per_s=images / max(train_time, 1e-9))
            if scheduler is not None:
                with warnings.catch_warnings():
                    # Resumed exactly at an epoch's end, no optimizer.step() precedes this one in this process;
                    # the restored state makes the step correct, so torch's order warning is noise.
                    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                    scheduler.step()
        bar.close()
        strategy.eval()
        return train_time, images

    def _task_ids(self, task_id: int | None, n: int) -> torch.Tensor | None:
        return None if task_id is None else torch.full((n,), task_id, device=self.device)

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, stream: Stream, strategy: Strategy, upto: int, mask_to_seen: bool = True,
                 ) -> tuple[list[float], list[float], list[int]]:
        """Accuracy (percent) on experiences 0..upto in one pass over the union of their test sets.

        Class-IL accuracy masks classes not seen yet (a growing head cannot predict them); task-IL accuracy
        masks the logits to the sample's own experience classes (Mammoth's logit masking).
        """
        strategy.eval()
        # The protocol may name fixed groups other than the experiences (forgetting: every class group, every time)
        exps = list(stream.protocol.eval_experiences or [stream[j] for j in range(upto + 1)])
        union = ConcatDataset([e.test for e in exps])
        counts = [len(e.test) for e in exps]
        sample_exp = torch.repeat_interleave(torch.arange(len(exps)), torch.tensor(counts)).to(self.device)
        n_classes = stream.info.n_classes
        exp_masks = torch.zeros(len(exps), n_classes, dtype=torch.bool, device=self.device)
        for j, e in enumerate(exps):
            exp_masks[j, list(e.classes)] = True
        correct = torch.zeros(len(exps), dtype=torch.long, device=self.device)
        correct_task = torch.zeros(len(exps), dtype=torch.long, device=self.device)
        loader = make_loader(union, batch_size=self._eval_batch_size(strategy), shuffle=False,
                             num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda",
                             desc=f"evaluate {len(exps)} experience(s)")
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        task_il = stream.protocol.task_ids
        cached = self._cached_features(strategy, exps)  # frozen encoder: each test image encoded once
        offset = 0
        for x, y in (cached if cached is not None else loader):
            ids = sample_exp[offset: offset + len(y)]
            offset += len(y)
            y = y.to(self.device)
            task_ids = stream_task_ids(exps, ids) if task_il else None
            with self.autocast():
                if cached is not None:
                    logits = strategy.predict_features(x, task_id=task_ids)
                else:
                    logits = strategy.predict(to_model_input(x, size, chans, self.device), task_id=task_ids)
            logits = logits.float()
            if logits.shape[1] != n_classes:
                raise RuntimeError(f"{type(strategy).__name__}.predict returned {logits.shape[1]} logits; "
                                   f"expected one per global class ({n_classes})")
            cil = logits.masked_fill(~strategy.seen_mask, float("-inf")) if mask_to_seen else logits
            til = logits.masked_fill(~exp_masks[ids], float("-inf"))
            correct.index_add_(0, ids, (cil.argmax(1) == y).long())
            correct_task.index_add_(0, ids, (til.argmax(1) == y).long())
        cnt = torch.tensor(counts, dtype=torch.float64)
        acc = (correct.cpu().double() / cnt * 100).tolist()
        acc_task = (correct_task.cpu().double() / cnt * 100).tolist()
        return acc, acc_task, counts

    def _cached_features(self, strategy: Strategy, exps: list):
        """(features, labels) batches over the seen test sets from the feature cache, or None without one."""
        cache = strategy.feature_cache
        frozen = strategy.frozen_encoder() if cache is not None else None
        if frozen is None:
            return None
        key, encode = frozen
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        parts = [cache.features(key, encode, e.test, input_size=size, in_chans=chans) for e in exps]
        feats, labels = torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts])
        bs = self._eval_batch_size(strategy)
        return [(feats[k: k + bs], labels[k: k + bs]) for k in range(0, len(labels), bs)]

    def _eval_batch_size(self, strategy: Strategy) -> int:
        """`trainer.eval_batch_size`, unless the strategy declares its own (cl/engine/strategy.py)."""
        return int(strategy.test_batch_size or self.cfg.eval_batch_size)


def _skip_batches(batches, n: int) -> None:
    """Advances a fresh loader iterator past `n` batches of its order. In-process loading draws only the indices
    (nothing is decoded); with workers the batches are loaded and dropped, so each worker's RNG stays in step."""
    if n <= 0:
        return
    next_index = getattr(batches, "_next_index", None)
    if next_index is not None and getattr(batches, "_num_workers", None) == 0:
        for _ in range(n):
            next_index()
        return
    for _ in range(n):
        next(batches)


def stream_task_ids(exps, ids: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([e.task_id for e in exps], device=ids.device)
    return table[ids]


def normalize_groups(groups) -> list:
    """Parameters or param-group dicts -> a list the optimiser and the counters can both iterate."""
    out = []
    for g in groups:
        out.append({**g, "params": list(g["params"])} if isinstance(g, dict) else g)
    return out


def count_trainable(groups: list) -> int:
    seen: set[int] = set()
    total = 0
    for g in groups:
        params = g["params"] if isinstance(g, dict) else [g]
        for p in params:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total


def _pad(row: list[float], n: int) -> list[float | None]:
    return list(row) + [None] * (n - len(row))

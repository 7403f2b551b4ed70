"""The loop over experiences. It owns optimisation, precision, evaluation, costs and checkpoints, and
calls the strategy's hooks (cl/strategy.py) so that no method needs a trainer change.

Per experience i:
    strategy.observe_classes(exp); groups = strategy.begin_experience(exp)
    SGD epochs over strategy.training_data(stream[:i+1])  (or strategy.fit_experience)
    strategy.end_experience(exp, loader)
    evaluate every seen experience in one pass over the union of their test sets, then split per experience
    checkpoint, then the `experience_end` event
"""
from __future__ import annotations

import math
import random
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import ConcatDataset

from .data import make_loader, to_model_input
from .errors import ConfigError
from .progress import progress_bar
from .strategy import Batch, Strategy
from .stream import Stream

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "constant")


class NonFiniteLossError(RuntimeError):
    def __init__(self, experience: int, epoch: int, step: int, value: float):
        super().__init__(f"non-finite loss ({value}) at experience {experience}, epoch {epoch}, step {step}: "
                         f"lower the learning rate or enable trainer.clip_grad_norm")
        self.experience, self.epoch, self.step = experience, epoch, step


@dataclass
class TrainerConfig:
    epochs: int = 1
    batch_size: int = 32
    eval_batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    min_lr: float = 0.0
    clip_grad_norm: float | None = None
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"
    num_workers: int = 0
    eval_future: bool = False
    limit_train_batches: int | None = None
    log_every: int = 10
    progress: bool = True
    stop_after: int | None = None  # stop (resumably) after this many experiences in this process
    keep_checkpoints: int = 2
    seed: int = 0

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "TrainerConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"unknown trainer field(s) {unknown}: valid fields are {sorted(known)}")
        tc = cls(**dict(cfg))
        if tc.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown trainer.optimizer '{tc.optimizer}': expected one of {OPTIMIZERS}")
        if tc.scheduler not in SCHEDULERS:
            raise ConfigError(f"unknown trainer.scheduler '{tc.scheduler}': expected one of {SCHEDULERS}")
        if tc.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"unknown trainer.precision '{tc.precision}': expected auto, bf16 or fp32")
        return tc


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
            ) -> History:
        history = history or History()
        strategy.to(self.device)
        n = len(stream)
        if self.cfg.eval_future and history.initial_accuracy is None:
            row, task_row, counts = self.evaluate(stream, strategy, upto=n - 1, mask_to_seen=False)
            history.initial_accuracy, history.initial_task_il_accuracy = row, task_row
            history.test_counts = counts
        stop_at = n if self.cfg.stop_after is None else min(n, start + self.cfg.stop_after)
        for i in range(start, stop_at):
            exp = stream[i]
            self.log("experience_start", experience=i, classes=list(exp.classes))
            t0 = time.perf_counter()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            strategy.observe_classes(exp)
            groups = normalize_groups(strategy.begin_experience(exp))
            strategy.to(self.device)
            if stream.info.kind == "tta":
                # Continual test-time adaptation: no training phase; the experience's test batches arrive in a
                # fixed order and each is predicted, then adapted on (strategy.adapt), and scored online.
                t = time.perf_counter()
                row, task_row, counts = self.adapt_online(stream, strategy, i)
                train_time, train_images, trainable, eval_time = 0.0, 0, count_trainable(groups), 0.0
                adapt_time = time.perf_counter() - t
                strategy.end_experience(exp, None)
            else:
                adapt_time = None
                trainable = count_trainable(groups)
                train_time, train_images = self._learn(stream, strategy, groups, i)

                upto = n - 1 if self.cfg.eval_future else i
                t = time.perf_counter()
                row, task_row, counts = self.evaluate(stream, strategy, upto=upto)
                eval_time = time.perf_counter() - t
            history.acc_matrix.append(_pad(row, n))
            history.task_il_matrix.append(_pad(task_row, n))
            if len(counts) > len(history.test_counts):
                history.test_counts = counts
            mem, mem_kind = peak_memory_mb(self.device)
            n_eval = sum(counts)
            history.costs.append({
                "experience": i,
                "wall_s": time.perf_counter() - t0,
                "train_s": train_time,
                "eval_s": eval_time,
                "train_images": train_images,
                "train_images_per_s": train_images / train_time if train_time > 0 else None,
                "eval_images_per_s": n_eval / eval_time if eval_time > 0 else None,
                **({"adapt_s": adapt_time, "adapt_images_per_s": counts[i] / adapt_time if adapt_time else None}
                   if adapt_time is not None else {}),
                "forward_passes_per_test_image": strategy.forward_passes_per_test_image,
                "peak_memory_mb": mem,
                "peak_memory_kind": mem_kind,
                "trainable_params": trainable,
                "added_params": strategy.added_params(),
            })
            if self.on_experience_end is not None:
                self.on_experience_end(i, strategy, history)
        return history

    def _learn(self, stream: Stream, strategy: Strategy, groups: list, i: int) -> tuple[float, int]:
        """The training phase of experience i: SGD epochs, or the strategy's own fit; then end_experience."""
        exp = stream[i]
        train_data = strategy.training_data(stream[: i + 1])
        loader = make_loader(train_data, batch_size=self.cfg.batch_size, shuffle=True,
                             seed=self.cfg.seed * 1000 + i, num_workers=self.cfg.num_workers,
                             pin_memory=self.device.type == "cuda")
        if strategy.uses_sgd:
            train_time, train_images = self._train_sgd(strategy, groups, loader, i, len(stream), exp.task_id)
        else:
            t = time.perf_counter()
            strategy.fit_experience(exp, loader, self.device)
            train_time, train_images = time.perf_counter() - t, len(train_data)
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
        if c.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        cls = torch.optim.Adam if c.optimizer == "adam" else torch.optim.AdamW
        return cls(groups, lr=c.lr, weight_decay=c.weight_decay)

    def _train_sgd(self, strategy: Strategy, groups: list, loader, index: int, n_exp: int, task_id: int,
                   ) -> tuple[float, int]:
        c = self.cfg
        optimizer = self._make_optimizer(strategy, groups)
        if optimizer is None:
            return 0.0, 0
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=c.epochs, eta_min=c.min_lr)
                     if c.scheduler == "cosine" else None)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        steps_per_epoch = len(loader) if c.limit_train_batches is None else min(len(loader), c.limit_train_batches)
        bar = progress_bar(total=c.epochs * steps_per_epoch, desc=f"exp {index + 1}/{n_exp}", enabled=c.progress)
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        strategy.train()
        images, train_time, step = 0, 0.0, 0
        for epoch in range(c.epochs):
            strategy.begin_epoch(epoch, c.epochs)
            running, count = torch.zeros((), device=self.device), 0
            t_epoch = time.perf_counter()
            for b, (x, y) in enumerate(loader):
                if b >= steps_per_epoch:
                    break
                batch = Batch(to_model_input(x, size, chans, self.device), y.to(self.device, non_blocking=True),
                              self._task_ids(strategy, task_id, len(y)))
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
                        raise NonFiniteLossError(index, epoch, step, mean)
                    elapsed = train_time + time.perf_counter() - t_epoch
                    bar.set_postfix(epoch=f"{epoch + 1}/{c.epochs}", loss=f"{mean:.4f}",
                                    img_s=f"{images / max(elapsed, 1e-9):.0f}")
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            train_time += time.perf_counter() - t_epoch
            epoch_loss = (running / max(count, 1)).item()
            self.log("epoch_end", experience=index, epoch=epoch, loss=epoch_loss,
                     lr=optimizer.param_groups[0]["lr"], images_per_s=images / max(train_time, 1e-9))
            if scheduler is not None:
                scheduler.step()
        bar.close()
        strategy.eval()
        return train_time, images

    def _task_ids(self, strategy: Strategy, task_id: int, n: int) -> torch.Tensor | None:
        if strategy.info is not None and strategy.info.kind == "task_il":
            return torch.full((n,), task_id, device=self.device)
        return None

    # --- online test-time adaptation ------------------------------------------------------------
    def adapt_online(self, stream: Stream, strategy: Strategy, index: int,
                     ) -> tuple[list[float | None], list[float | None], list[int]]:
        """Predict-then-adapt over experience `index`'s test batches in their fixed order; accuracy scored online.

        Only the diagonal entry is defined: earlier domains are not revisited (CoTTA's protocol)."""
        exp = stream[index]
        loader = make_loader(exp.test, batch_size=self.cfg.batch_size, shuffle=False,
                             num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        bar = progress_bar(total=len(loader), desc=f"adapt {index + 1}/{len(stream)}", enabled=self.cfg.progress)
        for x, y in loader:
            x = to_model_input(x, size, chans, self.device)
            with self.autocast():
                logits = strategy.adapt(x)
            correct += (logits.float().argmax(1) == y.to(self.device)).sum()
            bar.update(1)
        bar.close()
        acc = correct.item() / len(exp.test) * 100
        row: list[float | None] = [None] * (index + 1)
        row[index] = acc
        counts = [len(e.test) for e in stream[: index + 1]]
        return row, list(row), counts

    # --- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, stream: Stream, strategy: Strategy, upto: int, mask_to_seen: bool = True,
                 ) -> tuple[list[float], list[float], list[int]]:
        """Accuracy (percent) on experiences 0..upto in one pass over the union of their test sets.

        Class-IL accuracy masks classes not seen yet (a growing head cannot predict them); task-IL accuracy
        masks the logits to the sample's own experience classes (Mammoth's logit masking).
        """
        strategy.eval()
        exps = [stream[j] for j in range(upto + 1)]
        union = ConcatDataset([e.test for e in exps])
        counts = [len(e.test) for e in exps]
        sample_exp = torch.repeat_interleave(torch.arange(len(exps)), torch.tensor(counts)).to(self.device)
        n_classes = stream.info.n_classes
        exp_masks = torch.zeros(len(exps), n_classes, dtype=torch.bool, device=self.device)
        for j, e in enumerate(exps):
            exp_masks[j, list(e.classes)] = True
        correct = torch.zeros(len(exps), dtype=torch.long, device=self.device)
        correct_task = torch.zeros(len(exps), dtype=torch.long, device=self.device)
        loader = make_loader(union, batch_size=self.cfg.eval_batch_size, shuffle=False,
                             num_workers=self.cfg.num_workers, pin_memory=self.device.type == "cuda")
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        task_il = stream.info.kind == "task_il"
        offset = 0
        for x, y in loader:
            ids = sample_exp[offset: offset + len(y)]
            offset += len(y)
            x = to_model_input(x, size, chans, self.device)
            y = y.to(self.device)
            with self.autocast():
                logits = strategy.predict(x, task_id=stream_task_ids(exps, ids) if task_il else None)
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

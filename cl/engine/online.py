"""Online adaptation (continual test-time adaptation): its strategy contract and its loop.

Why a loop of its own: a `tta` stream has no training phase. Each experience's test batches arrive in a fixed
order; the strategy predicts each batch and then adapts on it, and what it predicted is scored online (CoTTA's
protocol). The trainer runs this loop when the stream's protocol says `loop="online"` (cl/engine/kinds.py).

The contract (`cl.engine.strategy.OnlineAdaptation`), which a test-time strategy implements besides the `Strategy` hooks:

    begin_experience(exp)          (Strategy) reset at a domain shift or an order's start, if the method does
    adapt(x) -> logits             the prediction for x made before updating on x (may step several times)
    adapt_costs() -> dict          this experience's cost figures (forward passes per batch, saved-for-backward
                                   and resident state sizes, ...), read once when the experience ends
    end_experience(exp, None)      (Strategy) no training loader exists in this loop

The loop adds the experience's domain, its batch count and the wall time per batch to the costs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cl.engine.data import make_loader, to_model_input
from cl.engine.errors import ConfigError
from cl.engine.progress import progress_bar
from cl.engine.strategy import OnlineAdaptation  # noqa: F401  (the contract lives with the others; re-exported)

if TYPE_CHECKING:  # pragma: no cover
    from cl.engine.stream import Stream
    from cl.engine.strategy import Strategy
    from cl.engine.trainer import Trainer


@dataclass
class ExperienceOutcome:
    """What one experience of either loop measured, for the history and the cost record."""

    row: list
    task_row: list
    counts: list[int]
    train_s: float = 0.0
    train_images: int = 0
    eval_s: float = 0.0
    trainable: int = 0
    extra_costs: dict = field(default_factory=dict)  # the loop's own cost figures, after the common ones


class OnlineLoop:
    """Predict-then-adapt over one experience's test batches, scored online (only the diagonal entry is defined:
    earlier domains are not revisited)."""

    def __init__(self, trainer: "Trainer"):
        self.trainer = trainer

    def run(self, stream: "Stream", strategy: "Strategy", index: int, trainable: int) -> ExperienceOutcome:
        if not isinstance(strategy, OnlineAdaptation):
            raise ConfigError(f"strategy '{strategy.name}' has no online-adaptation contract (adapt, adapt_costs), "
                              f"which stream '{stream.info.name}' needs: use a test-time adaptation strategy")
        exp = stream[index]
        t = time.perf_counter()
        row, task_row, counts = self.adapt(stream, strategy, index)
        adapt_time = time.perf_counter() - t
        n_batches = max(1, -(-counts[index] // self.trainer.cfg.batch_size))
        costs = {"adapt_s": adapt_time, "adapt_images_per_s": counts[index] / adapt_time if adapt_time else None,
                 # per-domain cost figures of this family: time per batch, plus what the strategy counts itself
                 "domain": exp.domain, "batches": n_batches, "time_per_batch_s": adapt_time / n_batches,
                 **strategy.adapt_costs()}
        strategy.end_experience(exp, None)
        return ExperienceOutcome(row, task_row, counts, trainable=trainable, extra_costs=costs)

    def adapt(self, stream: "Stream", strategy: "Strategy", index: int,
              ) -> tuple[list[float | None], list[float | None], list[int]]:
        """Accuracy (percent) of what `adapt` returned on experience `index`'s batches, in their fixed order."""
        tr = self.trainer
        exp = stream[index]
        loader = make_loader(exp.test, batch_size=tr.cfg.batch_size, shuffle=False,
                             num_workers=tr.cfg.num_workers, pin_memory=tr.device.type == "cuda", desc=None)
        size, chans = strategy.backbone.input_size, strategy.backbone.in_chans
        correct = torch.zeros((), dtype=torch.long, device=tr.device)
        bar = progress_bar(total=len(loader), desc=f"adapt {index + 1}/{len(stream)}", enabled=tr.cfg.progress)
        for x, y in loader:
            x = to_model_input(x, size, chans, tr.device)
            with tr.autocast():
                logits = strategy.adapt(x)
            correct += (logits.float().argmax(1) == y.to(tr.device)).sum()
            bar.update(1)
        bar.close()
        acc = correct.item() / len(exp.test) * 100
        row: list[float | None] = [None] * (index + 1)
        row[index] = acc
        counts = [len(e.test) for e in stream[: index + 1]]
        return row, list(row), counts

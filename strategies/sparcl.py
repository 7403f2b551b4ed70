"""SparCL: sparse continual learning on the edge (Wang et al., NeurIPS'22; code `neu-spiral/SparCL`), on DER++.

Algorithm (the reference script `run_mag_prune_irr_sp_EM_0.75_gradient0.80.sh`, per experience of E epochs):

    once, before any training: magnitude-prune the 16 layer1..4 convs to `sparsity`   (--sp-prune-before-retrain)
    per epoch e (the counter restarts every experience):
      TDM  if e is a mask-update epoch (every 5 epochs, from 0):
             importance = |W| + 0.5 |grad W|, grad W being the last batch's gradient, never zeroed in between
             (current + buffer loss, so the mask is task-aware; at a new experience it is the previous one's)
             prune every layer to the phase's lower bound, then regrow random pruned positions (weights start at
             0) up to the phase's upper bound.  Phases: e < 5: 75% / 74%;  5 <= e < 45: 76% / 75%;  e >= 45: 75%
             fixed (no regrow), so each experience ends at exactly `sparsity`.
      DDR  if 0 < e <= 20 and e is a multiple of 5: remove the remove_n / 4 examples of this experience with the
             fewest forgetting events (Toneva et al.: a correct -> wrong flip between presentations; an example
             never classified correctly counts E), then reset the statistics
      per batch: DER++ loss (strategies/derpp.py); backward;
      DGM  grad *= weight mask; every 30th batch of the epoch (from the first) keep only the top 20% |grad| of
             each masked layer and store that as the gradient mask, on the other batches apply the stored mask;
           SGD step; W *= weight mask

Training FLOPs (`metrics.train_flops`) are counted per step from the layers actually run (cl/engine/flops.py) with each
masked layer's forward and input-gradient cost scaled by its mask density and its weight-gradient cost by the
gradient-mask density; `metrics.train_flops_dense` is the same steps without sparsity; removed examples are simply
never run. `metrics.sparsity` is the fraction of exact zeros in the masked layers.

Deliberate differences from the reference code, and why:
- Schedule length: the reference's epochs (updates every 5, phases at 5 and 45, removal up to 20) assume 50 epochs
  per experience (`schedule_epochs`). With E != 50 they are scaled by E/50 (rounded; at least every epoch) and the
  last phase's start is always an update epoch, so short runs (debug=fast: E = 1) also end at exactly `sparsity`.
  At E = 50 the schedule is the reference's.
- Masks come from an exact top-k on the device (exactly round(s*n) zeros per layer), not numpy percentiles on the
  CPU (`imp > percentile`, which can keep a few more or fewer). DDR's per-example statistics are device tensors
  (the reference appends per-sample `.item()` values to Python lists).
- DDR ties (equal forgetting counts) are removed in dataset order; the reference's order among ties is numpy's
  unstable argsort over dict order.
- `remove_fraction` (default 0.3 = 3000 of a Split CIFAR-10 task's 10000 images) scales DDR to other streams;
  `remove_n` gives the reference's absolute count.
- The example ids come from the trainer (`needs_index`: `Batch.index`, a position in `IndexedView`, mapped back to
  the experience's full train set as the reference's `train_indx[index]`). The loader drops an incomplete last
  batch (`drop_last`, the reference's `continue` at :282-283), except when the whole set fits in one batch (the
  reference would then train on nothing). Resuming inside an experience after a removal
  replays that epoch over the examples kept before the removal (the removal state is restored after the loader
  has drawn the epoch's order); resuming at experience boundaries is exact except that the un-zeroed gradient
  used by the next mask update is not checkpointed.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from cl.engine.errors import ConfigError
from cl.engine.strategy import Batch

from .derpp import PRUNABLE, DERpp, prunable_weights


# --- masks -------------------------------------------------------------------------------------------------
def importance(weight: torch.Tensor, grad: torch.Tensor | None, lmd: float = 0.5) -> torch.Tensor:
    """|W| + lambda |grad| (lambda = sp_lmd 0.5 in the reference); grad may be None (initial prune)."""
    imp = weight.detach().abs()
    return imp if grad is None else imp + lmd * grad.detach().abs()


def exact_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the top (1 - sparsity) fraction of `score`: exactly round(sparsity*n) zeros."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n = score.numel()
    keep = n - int(round(sparsity * n))
    mask = torch.zeros(n, dtype=torch.bool, device=score.device)
    mask[torch.topk(score.flatten().float(), keep).indices] = True
    return mask.view_as(score)


def regrow(mask: torch.Tensor, grow_to: float, generator: torch.Generator) -> torch.Tensor:
    """Turns on random off positions until the mask's sparsity is `grow_to` (weight_growing, irregular)."""
    n = mask.numel()
    off = (~mask).flatten().nonzero().flatten()
    n_grow = min(max(off.numel() - int(round(grow_to * n)), 0), off.numel())
    if n_grow == 0:
        return mask
    pick = torch.randperm(off.numel(), generator=generator)[:n_grow].to(off.device)
    out = mask.clone().flatten()
    out[off[pick]] = True
    return out.view_as(mask)


def sparsity_of(tensors) -> float:
    """Fraction of exact zeros over all given tensors."""
    total = sum(t.numel() for t in tensors)
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total


# --- schedule ----------------------------------------------------------------------------------------------
class Schedule:
    """When masks update (and to which bounds) and when data is removed, for an experience of `epochs` epochs."""

    def __init__(self, epochs: int, *, ref_epochs: int, update_freq: int, decay_epochs: list[int],
                 prune_bounds: list[float], grow_bounds: list[float], remove_epoch: int):
        scale = epochs / ref_epochs
        self.epochs = epochs
        if epochs == ref_epochs:
            self.freq, self.decay, self.remove_epoch = update_freq, list(decay_epochs), remove_epoch
        else:
            self.freq = max(1, round(update_freq * scale))
            self.decay = [min(epochs - 1, round(d * scale)) for d in decay_epochs]
            self.remove_epoch = round(remove_epoch * scale)
        self.prune_bounds, self.grow_bounds = prune_bounds, grow_bounds

    def phase(self, epoch: int) -> int:
        return min(sum(epoch >= d for d in self.decay), len(self.prune_bounds) - 1)

    def updates_mask(self, epoch: int) -> bool:
        return epoch % self.freq == 0 or epoch in self.decay

    def bounds(self, epoch: int) -> tuple[float, float]:
        k = self.phase(epoch)
        return self.prune_bounds[k], self.grow_bounds[k]

    def removal_epochs(self) -> list[int]:
        return [e for e in range(1, self.epochs) if e % self.freq == 0 and e <= self.remove_epoch]


# --- dynamic data removal ----------------------------------------------------------------------------------
class IndexedView(Dataset):
    """The kept examples of one experience's train set. The trainer's `Batch.index` is a position in this view;
    `base_index` maps it back to the example's index in the full set (the reference's `train_indx[index]`)."""

    def __init__(self, base: Dataset, parent: "IndexedView | None" = None):
        self.base, self.parent = base, parent
        self._keep = np.arange(len(base)) if parent is None else None
        self._keep_dev: dict[torch.device, torch.Tensor] = {}

    @property
    def keep(self) -> np.ndarray:
        return self.parent.keep if self.parent is not None else self._keep

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int):
        return self.base[int(self.keep[i])]

    def eval_view(self) -> "IndexedView":
        """The same kept examples, un-augmented (Batch.raw); follows this view's removals."""
        from cl.engine.stream import eval_view

        return IndexedView(eval_view(self.base), parent=self)

    def base_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions in this view -> indices in the full set, on the positions' device (no host sync)."""
        dev = positions.device
        if dev not in self._keep_dev:
            self._keep_dev[dev] = torch.as_tensor(self.keep, dtype=torch.long, device=dev)
        return self._keep_dev[dev][positions]

    def __getstate__(self):  # loader workers get the kept indices, not the device copies
        return {**self.__dict__, "_keep_dev": {}}

    def remove(self, indices) -> None:
        if self.parent is not None:
            raise ValueError("remove on the parent IndexedView")
        self._keep = np.setdiff1d(self._keep, np.asarray(indices, dtype=np.int64))
        self._keep_dev.clear()


class ForgettingStats:
    """Per-example forgetting events over presentations (Toneva et al.), kept on the device."""

    def __init__(self, n: int, device: torch.device):
        self.prev = torch.full((n,), -1, dtype=torch.int8, device=device)  # -1: not presented since the reset
        self.forgets = torch.zeros(n, dtype=torch.int32, device=device)
        self.learned = torch.zeros(n, dtype=torch.bool, device=device)

    @torch.no_grad()
    def record(self, idx: torch.Tensor, correct: torch.Tensor) -> None:
        c = correct.to(torch.int8)
        self.forgets[idx] += ((self.prev[idx] == 1) & (c == 0)).int()
        self.learned[idx] |= correct
        self.prev[idx] = c

    def scores(self, never_learned: int) -> torch.Tensor:
        """Forgetting count; `never_learned` (the experience's epochs) for examples never classified correctly."""
        return torch.where(self.learned, self.forgets, torch.full_like(self.forgets, never_learned))

    def least_forgotten(self, n: int, never_learned: int) -> np.ndarray:
        """Indices of the `n` presented examples with the fewest forgetting events (ties in index order)."""
        presented = (self.prev >= 0).nonzero().flatten()
        s = self.scores(never_learned)[presented].cpu().numpy()
        order = np.argsort(s, kind="stable")
        return presented.cpu().numpy()[order[:n]]

    def reset(self) -> None:
        self.prev.fill_(-1)
        self.forgets.zero_()
        self.learned.zero_()


# --- the strategy ------------------------------------------------------------------------------------------
class SparCL(DERpp):
    name = "sparcl"
    needs_index = True  # per-example forgetting statistics (Batch.index, mapped through IndexedView)
    drop_last = True  # the reference skips an incomplete last batch (:282-283): the last gradient is a full batch's

    def __init__(self, sparsity: float = 0.75, prune_bounds: list[float] | None = None,
                 grow_bounds: list[float] | None = None, schedule_epochs: int = 50, mask_update_freq: int = 5,
                 mask_update_decay_epochs: list[int] = (5, 45), importance_lambda: float = 0.5,
                 remove_data_epoch: int = 20, remove_n: int | None = None, remove_fraction: float = 0.3,
                 gradient_sparsity: float = 0.8, gradient_sample_frequency: int = 30,
                 gradient_masking: bool = True, prune_layers: str = PRUNABLE, **hparams: Any):
        if not 0.0 <= float(sparsity) < 1.0:
            raise ConfigError(f"strategy.sparsity must be in [0, 1), got {sparsity}: e.g. 0.75, 0.9 or 0.95")
        s = float(sparsity)
        # The reference's bounds for 75% ("0.75-0.76-0.75" / "0.74-0.75-0.75"), as offsets from the target.
        prune_bounds = [float(v) for v in (prune_bounds or [s, round(s + 0.01, 6), s])]
        grow_bounds = [float(v) for v in (grow_bounds or [round(s - 0.01, 6), s, s])]
        decay = [int(v) for v in mask_update_decay_epochs]
        if len(prune_bounds) != len(grow_bounds) or len(prune_bounds) != len(decay) + 1:
            raise ConfigError("strategy.prune_bounds and grow_bounds need one entry per phase: "
                              f"len(mask_update_decay_epochs) + 1 = {len(decay) + 1}")
        if prune_bounds[-1] != s or grow_bounds[-1] != s:
            raise ConfigError(f"the last phase must prune and grow to strategy.sparsity={s} (got "
                              f"{prune_bounds[-1]} / {grow_bounds[-1]}): fix prune_bounds / grow_bounds")
        if any(g > p for p, g in zip(prune_bounds, grow_bounds)):
            raise ConfigError("strategy.grow_bounds must not exceed prune_bounds (regrowing lowers sparsity)")
        if not 0.0 <= float(gradient_sparsity) < 1.0:
            raise ConfigError(f"strategy.gradient_sparsity must be in [0, 1), got {gradient_sparsity}")
        if remove_n is None and not 0.0 <= float(remove_fraction) < 1.0:
            raise ConfigError(f"strategy.remove_fraction must be in [0, 1), got {remove_fraction}")
        super().__init__(sparsity=s, prune_bounds=prune_bounds, grow_bounds=grow_bounds,
                         schedule_epochs=schedule_epochs, mask_update_freq=mask_update_freq,
                         mask_update_decay_epochs=decay, importance_lambda=importance_lambda,
                         remove_data_epoch=remove_data_epoch, remove_n=remove_n, remove_fraction=remove_fraction,
                         gradient_sparsity=gradient_sparsity, gradient_sample_frequency=gradient_sample_frequency,
                         gradient_masking=gradient_masking, prune_layers=prune_layers, **hparams)
        self.sparsity, self.prune_bounds, self.grow_bounds = s, prune_bounds, grow_bounds
        self.schedule_kw = dict(ref_epochs=int(schedule_epochs), update_freq=int(mask_update_freq),
                                decay_epochs=decay, prune_bounds=prune_bounds, grow_bounds=grow_bounds,
                                remove_epoch=int(remove_data_epoch))
        self.lmd = float(importance_lambda)
        self.remove_n, self.remove_fraction = remove_n, float(remove_fraction)
        self.gradient_sparsity, self.sample_frequency = float(gradient_sparsity), int(gradient_sample_frequency)
        self.gradient_masking, self.prune_layers = bool(gradient_masking), prune_layers

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        named = prunable_weights(backbone, self.prune_layers)
        if not named:
            raise ConfigError(f"no backbone weight matches strategy.prune_layers={self.prune_layers!r}: SparCL "
                              f"sparsifies a ResNet's layer1..4 convs; use backbone=resnet18 or resnet18-tiny")
        self.mask_names = [n for n, _ in named]
        self._weights = [p for _, p in named]
        self._mask_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        # Initial magnitude prune of the randomly initialised net (--sp-prune-before-retrain).
        for i, w in enumerate(self._weights):
            self.register_buffer(f"wmask_{i}", exact_mask(importance(w, None), self.sparsity))
            self.register_buffer(f"gmask_{i}", torch.ones_like(w, dtype=torch.bool))
        self.apply_weight_masks()
        self._cache_densities()
        self._view: IndexedView | None = None
        self._stats: ForgettingStats | None = None
        self._schedule: Schedule | None = None
        self._batch_in_epoch = 0
        self._idx: torch.Tensor | None = None

    # --- masks -------------------------------------------------------------------------------------------
    def wmask(self, i: int) -> torch.Tensor:
        return getattr(self, f"wmask_{i}")

    def gmask(self, i: int) -> torch.Tensor:
        return getattr(self, f"gmask_{i}")

    @torch.no_grad()
    def apply_weight_masks(self) -> None:
        for i, w in enumerate(self._weights):
            w.mul_(self.wmask(i))

    def _cache_densities(self) -> None:
        """Mask densities as Python numbers for FLOP accounting (one host sync per mask update)."""
        self._nnz = [int(self.wmask(i).sum()) for i in range(len(self._weights))]
        self._numel = [w.numel() for w in self._weights]
        self._density = [k / n for k, n in zip(self._nnz, self._numel)]

    @torch.no_grad()
    def update_masks(self, prune_to: float, grow_to: float) -> None:
        """TDM: prune to `prune_to` by |W| + lambda |grad| (the un-zeroed last gradient), regrow to `grow_to`."""
        for i, w in enumerate(self._weights):
            pruned = exact_mask(importance(w, w.grad, self.lmd), prune_to)
            w.mul_(pruned)
            self.wmask(i).copy_(regrow(pruned, grow_to, self._mask_gen))  # regrown weights start at zero
        self._cache_densities()

    def flop_layer_paths(self) -> list[str]:
        return [n.rsplit(".", 1)[0] for n in self.mask_names]

    # --- data ------------------------------------------------------------------------------------------
    def training_data(self, seen):
        self._view = IndexedView(super().training_data(seen))
        self._stats = None
        return self._view

    def begin_epoch(self, epoch: int, n_epochs: int) -> None:
        if self._schedule is None or self._schedule.epochs != n_epochs or epoch == 0:
            self._schedule = Schedule(n_epochs, **self.schedule_kw)
        sched = self._schedule
        if sched.updates_mask(epoch):
            self.update_masks(*sched.bounds(epoch))
        if self._view is not None and epoch in sched.removal_epochs() and self._stats is not None:
            total = len(self._view.base)
            n_total = self.remove_n if self.remove_n is not None else int(self.remove_fraction * total)
            n = int(n_total / len(sched.removal_epochs()))
            drop = self._stats.least_forgotten(n, never_learned=n_epochs)
            self._view.remove(drop)
            self._stats.reset()
        self._batch_in_epoch = 0

    def train_step(self, batch: Batch) -> torch.Tensor:
        if self._view is not None:
            if batch.index is None:
                raise ValueError("SparCL's data removal needs Batch.index (the trainer fills it for strategies "
                                 "with needs_index; a direct caller passes Batch(x, y, index=..., raw=...))")
            self._idx = self._view.base_index(batch.index)
        return super().train_step(batch)

    def after_forward(self, batch: Batch, z: torch.Tensor) -> None:
        if self._view is None or self._idx is None:
            return
        if self._stats is None:
            self._stats = ForgettingStats(len(self._view.base), z.device)
        self._stats.record(self._idx.to(z.device), z.detach().argmax(1) == batch.y)

    # --- gradients and weights -------------------------------------------------------------------------
    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        sample = self._batch_in_epoch % self.sample_frequency == 0
        for i, w in enumerate(self._weights):
            if w.grad is None:
                continue
            if not self.gradient_masking or sample:
                w.grad.mul_(self.wmask(i))
            if self.gradient_masking:
                if sample:  # keep the top (1 - gradient_sparsity) |grad| entries, within the weight mask, that
                    # are non-zero (the reference's mask is `grad != 0` after thresholding, retrain.py:185-189)
                    top = exact_mask(w.grad.abs(), self.gradient_sparsity) & self.wmask(i)
                    self.gmask(i).copy_(top & (w.grad != 0))
                w.grad.mul_(self.gmask(i))
        if self.gradient_masking and not sample:
            keep = [n - int(round(self.gradient_sparsity * n)) for n in self._numel]
            grad_density = [min(k, z) / n for k, z, n in zip(keep, self._nnz, self._numel)]
        else:
            grad_density = self._density
        self.flops.add(self._n_images, self._density, grad_density)
        self._batch_in_epoch += 1

    def after_optimizer_step(self) -> None:
        self.apply_weight_masks()

    def run_metrics(self) -> dict:
        out = super().run_metrics()
        masks = [self.wmask(i) for i in range(len(self._weights))]
        out["sparsity"] = sparsity_of([w.detach() for w in self._weights])
        out["mask_sparsity"] = 1.0 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        out["sparsity_target"] = self.sparsity
        return out

    def get_extra_state(self):
        return {**super().get_extra_state(), "mask_gen": self._mask_gen.get_state()}

    def set_extra_state(self, state) -> None:
        super().set_extra_state(state)
        self._mask_gen.set_state(state["mask_gen"])

    def load_state_dict(self, state_dict, strict: bool = True):
        result = super().load_state_dict(state_dict, strict=strict)
        self._cache_densities()
        return result


__all__ = ["SparCL", "importance", "exact_mask", "regrow", "sparsity_of", "Schedule", "IndexedView",
           "ForgettingStats"]

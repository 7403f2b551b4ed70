"""The strategy contract: what the trainer calls, in order (DESIGN.md, "Strategies").

    setup(backbone, info)              once
    begin_experience(exp)              add heads/adapters; return the parameter groups to optimise
    configure_optimizer(groups)        optional: the strategy's own optimiser (None: the trainer's default)
    begin_epoch(epoch, n_epochs)       optional: per-epoch switches (LAE's frozen-PET warm-up epochs)
    train_step(batch) -> loss          one step's loss; the trainer does backward, autocast, clipping, step
    before_optimizer_step()            optional: edit gradients
    after_optimizer_step()             optional: EMA, pulls, restores, masks
    end_experience(exp, loader)        prototypes, statistics, merges
    predict(x, task_id=None) -> logits over all `info.n_classes` global class ids
    adapt(x) -> logits                 test-time strategies only: the online-adaptation contract of their own
                                       (`cl.engine.online.OnlineAdaptation`: adapt, adapt_costs), run by its own loop
    state_dict() / load_state_dict()   plain tensors and numbers, for resume

A strategy that does not learn by SGD sets `uses_sgd = False` and overrides `fit_experience`. A strategy with
several optimisation phases (SEMA's functional and descriptor phases, MOS's classifier alignment) runs each through
`self.optimiser(device).phase(step, data, ...)`, the trainer's routine (cl/engine/phases.py: optimiser and schedule from
the trainer config, autocast, loss checks, progress bar, stop checks), never a loop of its own.
Trainer values reach a strategy one way only: `trainer_cfg` (the run's `TrainerConfig`) is set before `setup`; strategy
configs never copy `trainer.*` (the trainer reads the strategy's `train:` block, configs/trainer/default.yaml).
The strategy is an `nn.Module`, so its state is its modules' tensors plus `get_extra_state()`; a strategy
that grows structure (a head or adapter per task) must rebuild it in `load_state_dict` before loading.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cl.engine.stream import Experience, Stream, StreamInfo
from cl.engine.trainer_config import TrainerConfig


@dataclass
class Batch:
    """One mini-batch on the device: `x` float images in [0, 1] at the backbone's input size.

    Optional fields, filled only for a strategy that declares it needs them (no cost for the others):
    `index` (`needs_index = True`): each sample's position in the dataset `training_data` returned (int64);
    `raw` (`needs_raw_input = True`): the same samples before augmentation (the dataset's `eval_view`), float in
    [0, 1] at the dataset's own size, not resized (DER++ stores these and re-augments them itself)."""

    x: torch.Tensor
    y: torch.Tensor
    task_id: torch.Tensor | None = None
    index: torch.Tensor | None = None
    raw: torch.Tensor | None = None


class Strategy(nn.Module):
    """Base class with the hooks' defaults. Subclasses set `name`, `supports` and override what they need."""

    name = "base"
    supports: tuple[str, ...] = ("class_il", "task_il", "domain_il")
    uses_sgd = True
    forward_passes_per_test_image = 1
    # What the trainer's training loader provides (see Batch): sample indices, un-augmented inputs, and whether
    # an incomplete last batch is dropped (SparCL's reference skips it; a set no larger than one batch is kept).
    needs_index = False
    needs_raw_input = False
    drop_last = False
    # The batch size the trainer evaluates this strategy with; None: `trainer.eval_batch_size`. For a strategy
    # whose scores depend on how the test set is batched (MOS's reference pulls rewrite state per test batch).
    test_batch_size: int | None = None
    # The run's trainer settings, set by `strategies.build(..., trainer=...)` before `setup` (run_experiment passes the
    # TrainerConfig its Trainer runs with; `setup` fills in the trainer default when nobody did). For a strategy that
    # runs its own loop (Avalanche's) or derives a hyperparameter from the trainer's (MOS's CA weight decay, GS-LoRA's
    # proximal lr): it reads them here rather than interpolating `${trainer.*}` into its config, which made values
    # go round in a circle (the trainer reads `strategy.train.*`).
    trainer_cfg: TrainerConfig | None = None

    def __init__(self, **hparams: Any):
        super().__init__()
        self.hparams = dict(hparams)
        self.backbone: nn.Module | None = None
        self.info: StreamInfo | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    def setup(self, backbone: nn.Module, info: StreamInfo) -> None:
        if self.trainer_cfg is None:
            self.trainer_cfg = TrainerConfig()
        self.backbone = backbone
        self.info = info
        # The pre-trained model's own size, taken before any PEFT module is inserted into it: everything
        # beyond it (adapters inside its blocks included) counts as added by the method.
        self._base_backbone_params = sum(p.numel() for p in backbone.parameters())
        self.register_buffer("seen_mask", torch.zeros(info.n_classes, dtype=torch.bool))
        self.register_buffer("current_mask", torch.zeros(info.n_classes, dtype=torch.bool))
        self.register_buffer("experiences_seen", torch.zeros((), dtype=torch.long))

    def observe_classes(self, exp: Experience) -> None:
        """Called by the trainer before `begin_experience`: which classes are known now."""
        self.current_mask.zero_()
        self.current_mask[list(exp.classes)] = True
        self.seen_mask |= self.current_mask
        self.experiences_seen += 1

    def training_data(self, seen: Stream) -> Dataset:
        """The data trained on for the latest experience (joint training returns the union)."""
        return seen[-1].train

    def begin_experience(self, exp: Experience) -> Iterable[Any]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizer(self, groups: Iterable[Any]) -> torch.optim.Optimizer | None:
        return None

    def begin_epoch(self, epoch: int, n_epochs: int) -> None:
        pass

    def train_step(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement train_step (or set uses_sgd = False)")

    def before_optimizer_step(self) -> None:
        pass

    def after_optimizer_step(self) -> None:
        pass

    def fit_experience(self, exp: Experience, loader: DataLoader, device: torch.device) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets uses_sgd = False but has no fit_experience")

    def end_experience(self, exp: Experience, loader: DataLoader) -> None:
        pass

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    # --- frozen features (cl/engine/feature_cache.py) ------------------------------------------------------
    # Set by the trainer (a cl.engine.feature_cache.FeatureCache) when trainer.feature_cache is on; else None.
    feature_cache: Any = None

    def frozen_encoder(self):
        """(key, encode) when `predict(x) == predict_features(encode(x))` and `encode` no longer changes: the
        trainer then encodes each test image once and evaluates from cached features. None: no cache."""
        return None

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.frozen_encoder() needs predict_features")

    # --- optimisation phases (cl/engine/phases.py) ------------------------------------------------------------
    # Set by the trainer (a cl.engine.phases.Optimiser over its config) before each experience's training; else None.
    optimise = None

    def optimiser(self, device: torch.device | str | None = None):
        """The trainer's optimisation routine; outside a run (a test driving the hooks itself) one with the
        default trainer settings on `device`."""
        if self.optimise is not None:
            return self.optimise
        from cl.engine.phases import Optimiser
        from cl.engine.trainer_config import TrainerConfig

        return Optimiser(TrainerConfig(), device if device is not None else "cpu",
                         experience=max(int(getattr(self, "experiences_seen", 1)) - 1, 0))

    # --- helpers ---------------------------------------------------------------------------------
    def mask_unseen(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of classes not seen yet cannot win (the growing-head behaviour of PyCIL/PILOT)."""
        return logits.masked_fill(~self.seen_mask, float("-inf"))

    def backbone_params(self) -> int:
        return getattr(self, "_base_backbone_params", 0)

    def added_params(self) -> int:
        """Parameters the method added on top of the backbone (heads, adapters, prototypes)."""
        own = sum(p.numel() for p in self.parameters()) - self.backbone_params()
        extra = sum(b.numel() for n, b in self.named_buffers() if n.startswith(self.stored_buffers))
        return own + extra

    def trained_param_count(self) -> int | None:
        """Parameters trained in the experience just finished, when the parameter groups returned by
        `begin_experience` do not tell (SEMA creates its expansions inside `fit_experience`); None: count the groups."""
        return None

    def run_metrics(self) -> Mapping[str, Any]:
        """The method's own headline numbers so far (SparCL's sparsity and training FLOPs), merged into the
        result's `metrics` after every experience; plain numbers only."""
        return {}

    # Buffers that count as added parameters (prototypes, statistics): prefixes of their names.
    stored_buffers: tuple[str, ...] = ()

    def describe(self) -> Mapping[str, Any]:
        return {"name": self.name, "hparams": self.hparams}


class OnlineAdaptation:
    """The online-adaptation contract (a mixin for `Strategy` subclasses; strategies/tta_base.py implements it)."""

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for x predicted BEFORE the update on x; then the update."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt(x)")

    def adapt_costs(self) -> dict:
        """This experience's cost figures (plain numbers); the counters start again for the next experience."""
        return {}

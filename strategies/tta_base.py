"""Shared plumbing of the test-time adaptation strategies: the source classifier, BN modes, reset, costs.

The backbone a `tta` scenario composes is the source CLASSIFIER (`backbone.is_classifier`: `backbone(x)` gives
logits over the stream's classes; docs/tta.md). A strategy implements `forward_and_adapt(x)` (mariodoebler's
name), which returns the prediction for `x` made BEFORE it updates on `x`; the online loop (cl/engine/online.py) calls
`adapt(x)` and scores what it returns online, then reads `adapt_costs()` once per experience: the two methods of
the online-adaptation contract (`cl.engine.strategy.OnlineAdaptation`; its loop: cl/engine/online.py) that `TTAStrategy` implements.

`adapt` also measures what this family reports as cost (docs/tta.md, "Costs"), per experience:
- forward passes per batch: each strategy counts its passes with `count_passes(k)` (k batch-sized passes; CoTTA's
  32 augmented views in one call count 32);
- bytes saved for backward per batch: every tensor autograd keeps for the backward pass, counted with
  `torch.autograd.graph.saved_tensors_hooks` (distinct storages; the model's own parameters and buffers are not
  counted, they are resident anyway). Device independent, so EcoTTA's saving against CoTTA shows on a CPU;
- resident state: parameters and buffers of everything the method keeps (student, teacher, anchor, meta
  networks) plus the optimizer's state.
The trainer adds wall time per batch and the device's peak memory.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cl.engine.errors import ConfigError
from cl.engine.strategy import OnlineAdaptation
from cl.engine.strategy import Strategy


def use_batch_stats(model: nn.Module) -> None:
    """BN normalises with the test batch's statistics (TENT/CoTTA `configure_model`: no running stats)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


def bn_affine(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in (m.weight, m.bias) if p is not None]


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of the student's log-probabilities against the teacher's probabilities."""
    return -(teacher.softmax(1) * student.log_softmax(1)).sum(1)


def _storage_key(t: torch.Tensor):
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without storage (functional wrappers)
        return (t.device, id(t))


class SavedForBackward:
    """Context manager: the bytes of the distinct tensors autograd saves for backward inside it, `exclude`d
    storages (parameters, buffers) not counted."""

    def __init__(self, exclude: set | None = None):
        self.exclude = exclude or set()
        self.seen: set = set()
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            try:
                self.bytes += t.untyped_storage().nbytes()
            except (RuntimeError, NotImplementedError):
                self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = _storage_key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


class TTAStrategy(OnlineAdaptation, Strategy):
    """A test-time adaptation method: a `Strategy` (setup, begin/end_experience, predict, state) that also keeps the
    online-adaptation contract (`adapt`, `adapt_costs`)."""

    supports = ("tta",)
    uses_sgd = False

    def setup(self, backbone, info) -> None:
        if not getattr(backbone, "is_classifier", False):
            raise ConfigError(f"{self.name} needs a source classifier backbone (e.g. backbone=synthetic-c or a "
                              "robustbench source), not a feature extractor")
        super().setup(backbone, info)
        self._source_state = copy.deepcopy(backbone.state_dict())
        self._batches = self._passes = self._saved_max = 0
        self._passes_total = self._batches_total = 0
        self.configure()
        self._initial_state = copy.deepcopy(self.state_dict())

    def configure(self) -> None:
        """Put the model in its adaptation mode and build what the method keeps (optimizer, teacher)."""

    def begin_experience(self, exp):
        """Reset to the source model at each domain shift (`reset_each_shift`) or at the start of each corruption
        order (`orders`: several orders in one stream, each from the source model)."""
        new_order = exp.index in (self.info.extra.get("order_starts") or [])
        if exp.index > 0 and (self.info.extra.get("reset_each_shift") or new_order):
            self.reset()
        self._order = (exp.meta or {}).get("order")
        return [p for p in self.parameters() if p.requires_grad]

    def reset(self) -> None:
        """Back to the source model and a fresh optimizer (TENT's `reset`, used at each domain shift)."""
        self.load_state_dict(self._initial_state)
        self.configure_state_reset()

    def configure_state_reset(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            opt.state.clear()

    @torch.no_grad()
    def predict(self, x, task_id=None):
        return self.backbone(x)

    # --- the online step and its costs ---------------------------------------------------------
    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction for x, then the method's update on x (default: no update)."""
        self.count_passes(1)
        return self.predict(x)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        with SavedForBackward(self._resident_keys()) as saved:
            out = self.forward_and_adapt(x)
        self._batches += 1
        self._batches_total += 1
        self._saved_max = max(self._saved_max, saved.bytes)
        self.forward_passes_per_test_image = self._passes_total / self._batches_total
        return out

    def count_passes(self, k: float = 1) -> None:
        """k forward passes over a batch-sized input (k views of the batch in one call count k)."""
        self._passes += k
        self._passes_total += k

    def kept_modules(self) -> list[nn.Module]:
        """Modules the method keeps outside its registered submodules (CoTTA's anchor copy)."""
        return []

    def _resident_keys(self) -> set:
        tensors = [*self.parameters(), *self.buffers()]
        for m in self.kept_modules():
            tensors += [*m.parameters(), *m.buffers()]
        return {_storage_key(t) for t in tensors}

    def resident_bytes(self) -> int:
        tensors = [*self.parameters(), *self.buffers()]
        for m in self.kept_modules():
            tensors += [*m.parameters(), *m.buffers()]
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensor_bytes(tensors)

    def adapt_costs(self) -> dict:
        """This experience's cost figures (read by the trainer once the experience ends); then reset."""
        n = max(self._batches, 1)
        out = {"forward_passes_per_batch": self._passes / n, "order": getattr(self, "_order", None),
               "saved_for_backward_mb": self._saved_max / 2**20,
               "resident_state_mb": self.resident_bytes() / 2**20}
        self._batches = self._passes = self._saved_max = 0
        return out

    def make_optimizer(self, params, optim: str, lr: float, momentum: float = 0.9, wd: float = 0.0,
                       nesterov: bool = False):
        if optim == "adam":
            return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), weight_decay=wd)
        if optim == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd, nesterov=nesterov)
        raise ConfigError(f"{self.name}: optim must be adam or sgd, got {optim!r}")


def source_batches(dataset, batch_size: int, device, size: int, chans: int, shuffle: bool = True, seed: int = 0,
                   limit: int | None = None):
    """(x in [0, 1] on device, y) batches of the scenario's declared source data (the experience's `train`)."""
    from cl.engine.data import make_loader, to_model_input

    if dataset is None or len(dataset) == 0:
        raise ConfigError("this strategy needs the scenario's declared source data (experience.train), but the "
                          "stream has none: use a scenario that declares it (e.g. scenario=synthetic-c)")
    seen = 0
    for x, y in make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed):
        if limit is not None and seen >= limit:
            break
        seen += len(y)
        yield to_model_input(x, size, chans, device), y.to(device)

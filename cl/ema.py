"""The engine's mean teacher: an exponential moving average (EMA) of a set of tensors, with optional stochastic
restore of the online tensors toward a source copy.

    mt = MeanTeacher(online, decay, restore_prob=0.0, source=None, generator=None)
    ...after each optimiser step:
    mt.update()        theta_off <- decay * theta_off + (1 - decay) * theta_on          (every tensor)
    mt.restore()       each element of the ONLINE tensors is reset to the source copy with probability
                       restore_prob (one Bernoulli draw per element; CoTTA's stochastic restore)
    mt.step()          update(), then restore() (CoTTA's order); restore is a no-op when restore_prob == 0
    mt.offline         {name: offline tensor}: e.g. `torch.func.functional_call(model, mt.offline, (x,))`
                       runs `model` with the offline (teacher) values without copying modules

`online` is an `nn.Module` (all its parameters, by their names), a mapping name -> tensor, or an iterable of
tensors (named "0", "1", ...). The online tensors are referenced, not copied: `update()`/`restore()` without an
argument use them; `update(other)` takes another collection of the same structure (same order and shapes).

Users: LAE's offline PET (decay 0.9999, no restore), and the test-time adaptation strategies (CoTTA: the
teacher is the EMA of the student, restore_prob 0.01 toward the source model).

Implementation notes:
- The update is one `torch._foreach_lerp_` over all tensors (`off + (1 - decay) * (on - off)`, which is the EMA
  formula), under `no_grad`, with no host synchronisation; decay 1 leaves the offline copy bitwise unchanged.
- The restore draws the mask per element with `generator` (which must live on the tensors' device) or, without
  one, the global RNG (whose state the engine checkpoints); the reset elements are bitwise the source values
  (`torch.where`, not an interpolation).
- State is plain tensors: the offline copies are buffers `ema_<i>`, the source copies (kept only when
  restore_prob > 0 or `source` is given) buffers `source_<i>`, so `state_dict()`/`load_state_dict()` of the
  owning module round-trip, `.to(device)` moves them, and a resumed process rebuilds the `MeanTeacher` from the
  same online tensors before loading. A private generator's state is saved as the module's extra state.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Union

import torch
from torch import nn

Tensors = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[torch.Tensor]]

__all__ = ["MeanTeacher", "named_tensors"]


def named_tensors(tensors: Tensors) -> dict[str, torch.Tensor]:
    """A module's named parameters, a mapping as given, or an iterable of tensors named "0", "1", ..."""
    if isinstance(tensors, nn.Module):
        return dict(tensors.named_parameters())
    if isinstance(tensors, Mapping):
        return dict(tensors)
    return {str(i): t for i, t in enumerate(tensors)}


class MeanTeacher(nn.Module):
    """EMA (offline / teacher) copy of a set of online tensors, with optional stochastic restore (see module doc).

    decay: the EMA momentum in [0, 1] (1: the offline copy never moves; 0: it copies the online tensors).
    restore_prob: probability in [0, 1] that `restore()` resets an online element to its source value.
    source: the restore target, same structure as `online`; default a copy of `online` at construction (CoTTA's
        source model). Only kept when restore_prob > 0 or given explicitly.
    generator: a `torch.Generator` on the tensors' device for the restore masks; None: the global RNG.
    """

    def __init__(self, online: Tensors, decay: float, restore_prob: float = 0.0, source: Tensors | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"MeanTeacher decay must be in [0, 1], got {decay}")
        if not 0.0 <= float(restore_prob) <= 1.0:
            raise ValueError(f"MeanTeacher restore_prob must be in [0, 1], got {restore_prob}")
        named = named_tensors(online)
        if not named:
            raise ValueError("MeanTeacher needs at least one tensor to follow")
        self.decay = float(decay)
        self.restore_prob = float(restore_prob)
        self.generator = generator
        self.names: list[str] = list(named)
        self._online: list[torch.Tensor] = list(named.values())  # references, not state
        for i, t in enumerate(self._online):
            self.register_buffer(f"ema_{i}", t.detach().clone())
        self.has_source = source is not None or self.restore_prob > 0
        if self.has_source:
            src = self._match(named_tensors(source)) if source is not None else self._online
            for i, t in enumerate(src):
                self.register_buffer(f"source_{i}", t.detach().clone())

    # --- views ---------------------------------------------------------------------------------------
    def offline_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f"ema_{i}") for i in range(len(self.names))]

    def source_tensors(self) -> list[torch.Tensor]:
        if not self.has_source:
            raise RuntimeError("this MeanTeacher keeps no source copy (restore_prob 0 and no source given)")
        return [getattr(self, f"source_{i}") for i in range(len(self.names))]

    @property
    def offline(self) -> dict[str, torch.Tensor]:
        """{name: offline tensor}, names as in the online collection (for `torch.func.functional_call`)."""
        return dict(zip(self.names, self.offline_tensors()))

    def _match(self, named: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        tensors = list(named.values())
        if len(tensors) != len(self.names):
            raise ValueError(f"expected {len(self.names)} tensors, got {len(tensors)}")
        for name, ref, t in zip(self.names, self._online, tensors):
            if t.shape != ref.shape:
                raise ValueError(f"tensor {name}: shape {tuple(t.shape)} != {tuple(ref.shape)}")
        return tensors

    def _online_tensors(self, online: Tensors | None) -> list[torch.Tensor]:
        return self._online if online is None else self._match(named_tensors(online))

    # --- the two operations --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, online: Tensors | None = None, freeze: list[torch.Tensor] | None = None) -> None:
        """theta_off <- decay * theta_off + (1 - decay) * theta_on, for every tensor, on the device.

        freeze: optional boolean masks, one per tensor: True elements keep their offline value (PSMT's
        Fisher-masked teacher, theta_off <- m theta_off + (1 - m) EMA)."""
        if self.decay == 1.0:
            return
        on = [t.detach() for t in self._online_tensors(online)]
        if freeze is None:
            torch._foreach_lerp_(self.offline_tensors(), on, 1.0 - self.decay)
            return
        for off, o, m in zip(self.offline_tensors(), on, freeze, strict=True):
            off.copy_(torch.where(m, off, off.lerp(o.to(off.dtype), 1.0 - self.decay)))

    @torch.no_grad()
    def restore(self, online: Tensors | None = None) -> None:
        """Each element of the online tensors becomes its source value with probability restore_prob."""
        if self.restore_prob == 0.0:
            return
        for t, src in zip(self._online_tensors(online), self.source_tensors()):
            mask = torch.rand(t.shape, generator=self.generator, device=t.device) < self.restore_prob
            t.copy_(torch.where(mask, src.to(t.dtype), t))

    def step(self, online: Tensors | None = None) -> None:
        """update(), then restore(): the per-step call of a mean-teacher strategy."""
        self.update(online)
        self.restore(online)

    # --- state ---------------------------------------------------------------------------------------
    def get_extra_state(self):
        state = self.generator.get_state() if self.generator is not None else torch.empty(0, dtype=torch.uint8)
        return {"generator": state}

    def set_extra_state(self, state) -> None:
        gen_state = state.get("generator") if isinstance(state, Mapping) else None
        if self.generator is not None and gen_state is not None and gen_state.numel():
            self.generator.set_state(gen_state)

    def extra_repr(self) -> str:
        n = sum(t.numel() for t in self._online)
        return (f"tensors={len(self.names)}, elements={n}, decay={self.decay}, "
                f"restore_prob={self.restore_prob}")

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

Implementation notes (issue 10, docs/speed.md):
- Flat buffers. The offline (and source) copies live in ONE flat buffer each; the buffers `ema_<i>` /
  `source_<i>` are views into it. When the online tensors are leaf tensors (parameters) of one dtype and device,
  they are re-homed at construction into one flat buffer too (`p.data` becomes a view; same Parameter objects,
  same values, so optimisers and modules are unaffected): the update is then ONE `lerp_` over the whole model
  instead of one kernel per tensor. A moved module (`.to()`) or an `assign=True` load breaks the views; they are
  re-linked at the next update (checked by pointer, no device sync). `flat_online=False` keeps the online
  tensors where they are; the update is then one `torch._foreach_lerp_` over all tensors.
- `impl`: "torch" (default; the PyTorch reference above) or "ext" (the fused C++/CUDA kernel of `cl.models.ops`,
  csrc/, opt-in with `impl="ext"` or `CLBENCH_OPS=ext`): EMA and restore in one pass over the flat buffers.
  The EMA is the same formula as `torch.lerp` in both (tested element for element against the per-tensor loop).
  The "ext" restore draws its uniforms from the kernels' counter-based hash of (seed, index), the seed a hash of
  a base drawn once at construction (from `generator` or the global RNG) and the number of restores so far:
  a Bernoulli(restore_prob) per element like "torch", reproducible and resumable, but not the same elements as
  "torch"'s `torch.rand` draws. "ext" needs float32 tensors on one device and flat online tensors.
- The EMA is `off + (1 - decay) * (on - off)` (torch.lerp; the EMA formula), under `no_grad`, with no host
  synchronisation; decay 1 leaves the offline copy bitwise unchanged.
- The restore draws the mask per element with `generator` (which must live on the tensors' device) or, without
  one, the global RNG (whose state the engine checkpoints); the reset elements are bitwise the source values
  (`torch.where`, not an interpolation).
- State is plain tensors: the offline copies are buffers `ema_<i>`, the source copies (kept only when
  restore_prob > 0 or `source` is given) buffers `source_<i>`, so `state_dict()`/`load_state_dict()` of the
  owning module round-trip, `.to(device)` moves them, and a resumed process rebuilds the `MeanTeacher` from the
  same online tensors before loading. A private generator's state is saved as the module's extra state.
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping, Union

import torch
from torch import nn

Tensors = Union[nn.Module, Mapping[str, torch.Tensor], Iterable[torch.Tensor]]

__all__ = ["MeanTeacher", "named_tensors", "IMPLS"]

IMPLS = ("torch", "ext")
_M32 = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """A 32-bit integer hash (the kernels' finaliser), for per-call restore seeds."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _spans(tensors: list[torch.Tensor]) -> list[tuple[int, int]]:
    out, a = [], 0
    for t in tensors:
        out.append((a, a + t.numel()))
        a += t.numel()
    return out


def _homogeneous(tensors: list[torch.Tensor]) -> bool:
    return all(t.dtype == tensors[0].dtype and t.device == tensors[0].device for t in tensors)


def _flat_copy(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One new flat buffer holding copies of `tensors`, and views of it shaped like them."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
    views = []
    for t, (a, b) in zip(tensors, _spans(tensors)):
        v = flat[a:b].view(t.shape)
        v.copy_(t.detach())
        views.append(v)
    return flat, views


def _is_view_of(views: list[torch.Tensor], flat: torch.Tensor | None, spans: list[tuple[int, int]]) -> bool:
    if flat is None:
        return False
    base, size = flat.data_ptr(), flat.element_size()
    return all(v.data_ptr() == base + a * size and v.device == flat.device for v, (a, _) in zip(views, spans))


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
    impl: "torch" | "ext" (see module doc); None: "ext" when the environment sets CLBENCH_OPS=ext and the tensors
        and the toolchain allow it (else "torch"), "torch" without CLBENCH_OPS=ext. An explicit "ext" that cannot
        run is an error.
    flat_online: re-home the online tensors into one flat buffer (None: when they are leaf tensors of one dtype
        and device; True: required, error otherwise; False: never).
    """

    def __init__(self, online: Tensors, decay: float, restore_prob: float = 0.0, source: Tensors | None = None,
                 generator: torch.Generator | None = None, impl: str | None = None,
                 flat_online: bool | None = None):
        super().__init__()
        from_env = impl is None
        impl = impl if impl is not None else ("ext" if os.environ.get("CLBENCH_OPS") == "ext" else "torch")
        if impl not in IMPLS:
            raise ValueError(f"MeanTeacher impl must be one of {IMPLS}, got {impl!r}")
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
        self._spans = _spans(self._online)
        self.impl = impl
        # offline and source copies: views into one flat buffer each (per-tensor copies when mixed dtype/device)
        self._flat: dict[str, torch.Tensor | None] = {"ema": None, "source": None, "online": None}
        self._store("ema", self._online)
        self.has_source = source is not None or self.restore_prob > 0
        if self.has_source:
            self._store("source", self._match(named_tensors(source)) if source is not None else self._online)
        eligible = self._online_eligible()
        if flat_online and not eligible:
            raise ValueError("MeanTeacher(flat_online=True) needs distinct leaf tensors of one dtype and device")
        self.flat_online = bool(eligible if flat_online is None else flat_online)
        if self.flat_online:
            self._rehome_online()
        if impl == "ext" and from_env and not (self.flat_online and self._online[0].dtype == torch.float32
                                               and self._ext_builds()):
            impl = self.impl = "torch"  # CLBENCH_OPS=ext is a preference: tensors or toolchain that cannot use it
        if impl == "ext" and not (self.flat_online and self._online[0].dtype == torch.float32):
            raise ValueError("MeanTeacher(impl='ext') needs float32 online tensors of one device that can be "
                             "flattened (distinct leaf tensors); use impl='torch' for others")
        # the ext restore's seeds: a base drawn once (generator or global RNG), hashed with the call count
        self._seed_base = 0
        self._restores = 0
        if impl == "ext" and self.restore_prob > 0:
            dev = generator.device if generator is not None else "cpu"
            self._seed_base = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=dev).item())

    @staticmethod
    def _ext_builds() -> bool:
        from cl.models import ops
        return ops.load_extension() is not None

    # --- flat storage --------------------------------------------------------------------------------
    def _store(self, kind: str, tensors: list[torch.Tensor]) -> None:
        if _homogeneous(tensors):
            self._flat[kind], views = _flat_copy(tensors)
        else:
            views = [t.detach().clone() for t in tensors]
        for i, v in enumerate(views):
            self._buffers[f"{kind}_{i}"] = v

    def _relink(self, kind: str) -> None:
        """Re-create the flat buffer of `kind` when its views were replaced (`.to()`, `load_state_dict(assign=)`)."""
        views = [self._buffers[f"{kind}_{i}"] for i in range(len(self.names))]
        if _homogeneous(views) and not _is_view_of(views, self._flat[kind], self._spans):
            self._store(kind, views)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._relink("ema")
        if self.has_source:
            self._relink("source")
        return out

    def _online_eligible(self) -> bool:
        ts = self._online
        return (_homogeneous(ts) and all(t._base is None and t.is_floating_point() for t in ts)
                and len({t.data_ptr() for t in ts if t.numel()}) == sum(1 for t in ts if t.numel()))

    @torch.no_grad()
    def _rehome_online(self) -> None:
        """The online tensors become views of one flat buffer (same objects and values: `t.data = view`)."""
        flat, views = _flat_copy(self._online)
        for t, v in zip(self._online, views):
            t.data = v
        self._flat["online"] = flat

    def _flat_views(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(offline flat, online flat) when both sides are intact flat buffers, else None (the foreach path)."""
        if not self.flat_online:
            return None
        if not _is_view_of(self._online, self._flat["online"], self._spans):
            if not self._online_eligible():
                return None
            self._rehome_online()  # the module was moved or its tensors replaced: flatten again
        self._relink("ema")
        if self._flat["ema"] is None or self._flat["ema"].dtype != self._flat["online"].dtype \
                or self._flat["ema"].device != self._flat["online"].device:
            return None
        return self._flat["ema"], self._flat["online"]

    # --- views ---------------------------------------------------------------------------------------
    def offline_tensors(self) -> list[torch.Tensor]:
        return [self._buffers[f"ema_{i}"] for i in range(len(self.names))]

    def source_tensors(self) -> list[torch.Tensor]:
        if not self.has_source:
            raise RuntimeError("this MeanTeacher keeps no source copy (restore_prob 0 and no source given)")
        return [self._buffers[f"source_{i}"] for i in range(len(self.names))]

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
        if freeze is not None:
            on = [t.detach() for t in self._online_tensors(online)]
            for off, o, m in zip(self.offline_tensors(), on, freeze, strict=True):
                off.copy_(torch.where(m, off, off.lerp(o.to(off.dtype), 1.0 - self.decay)))
            return
        flat = self._flat_views() if online is None else None
        if flat is not None:
            off, on = flat
            if self.impl == "ext":
                from cl.models import ops
                ops.mean_teacher_update_(off, on, None, self.decay, 0.0, 0, impl="ext")
            else:
                off.lerp_(on, 1.0 - self.decay)
            return
        on = [t.detach() for t in self._online_tensors(online)]
        torch._foreach_lerp_(self.offline_tensors(), on, 1.0 - self.decay)

    def _next_seed(self) -> int:
        self._restores += 1
        return _mix32(self._seed_base ^ _mix32(self._restores * 0x9E3779B9))

    @torch.no_grad()
    def restore(self, online: Tensors | None = None) -> None:
        """Each element of the online tensors becomes its source value with probability restore_prob."""
        if self.restore_prob == 0.0:
            return
        if self.impl == "ext" and online is None and self._flat_views() is not None:
            from cl.models import ops
            self._relink("source")
            off, on = self._flat_views()
            ops.mean_teacher_update_(off, on, self._flat["source"], 1.0, self.restore_prob, self._next_seed(),
                                     impl="ext")
            return
        for t, src in zip(self._online_tensors(online), self.source_tensors()):
            mask = torch.rand(t.shape, generator=self.generator, device=t.device) < self.restore_prob
            t.copy_(torch.where(mask, src.to(t.dtype), t))

    def step(self, online: Tensors | None = None) -> None:
        """update(), then restore(): the per-step call of a mean-teacher strategy ("ext": one fused pass)."""
        if self.impl == "ext" and online is None and self.restore_prob > 0 and self.decay < 1.0 \
                and self._flat_views() is not None:
            from cl.models import ops
            self._relink("source")
            off, on = self._flat_views()
            ops.mean_teacher_update_(off, on, self._flat["source"], self.decay, self.restore_prob,
                                     self._next_seed(), impl="ext")
            return
        self.update(online)
        self.restore(online)

    # --- state ---------------------------------------------------------------------------------------
    def get_extra_state(self):
        state = self.generator.get_state() if self.generator is not None else torch.empty(0, dtype=torch.uint8)
        return {"generator": state, "ext_seed": torch.tensor([self._seed_base, self._restores], dtype=torch.int64)}

    def set_extra_state(self, state) -> None:
        gen_state = state.get("generator") if isinstance(state, Mapping) else None
        if self.generator is not None and gen_state is not None and gen_state.numel():
            self.generator.set_state(gen_state)
        seeds = state.get("ext_seed") if isinstance(state, Mapping) else None
        if seeds is not None:
            self._seed_base, self._restores = (int(v) for v in seeds.tolist())

    def extra_repr(self) -> str:
        n = sum(t.numel() for t in self._online)
        return (f"tensors={len(self.names)}, elements={n}, decay={self.decay}, "
                f"restore_prob={self.restore_prob}, impl={self.impl}, flat_online={self.flat_online}")

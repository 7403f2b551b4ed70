"""Checkpoints hold what the strategy changed, not the frozen pre-trained weights.

A strategy's `state_dict()` contains its backbone: 343 MB for a ViT-B/16 whose weights never change under SimpleCIL,
saved again after every experience. At build time (`FrozenReference(strategy, weights_id)`) each tensor of the
freshly built strategy gets a content digest; at save time every tensor whose content still has that digest is left
out of the checkpoint and recorded by key and digest instead, with the backbone's weights id. On resume the strategy
is built again from the same weights and seed, the recorded weights id and each referenced tensor's digest are
checked against the rebuilt one, and the tensors are put back before `load_state_dict`: so resume stays bit-exact,
and a changed weights file is refused with one line instead of being mixed in silently.

Digests are computed from the bytes, not tracked through version counters: in-place writes through `.data` (EMA
teachers, adapter pulls) do not bump a parameter's version, and must still be saved.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

import torch
from torch import nn

from cl.engine.errors import BackboneError


def tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1)
    h = hashlib.sha256(f"{data.dtype}:{tuple(t.shape)}:".encode())
    h.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()[:32]


def _digests(state: Mapping[str, Any]) -> dict[str, str]:
    return {k: tensor_digest(v) for k, v in state.items() if isinstance(v, torch.Tensor)}


class FrozenReference:
    """The freshly built strategy's tensors, by digest; `split` before saving, `restore` after loading."""

    def __init__(self, module: nn.Module, weights_id: str | None):
        self.module = module
        self.weights_id = weights_id
        self.built = _digests(module.state_dict())

    def split(self, state: Mapping[str, Any]) -> tuple[dict, dict]:
        """(the state without the untouched tensors, the reference that names them)."""
        kept, referenced = {}, {}
        for key, value in state.items():
            if (isinstance(value, torch.Tensor) and key in self.built and value.numel() > 0
                    and tensor_digest(value) == self.built[key]):
                referenced[key] = self.built[key]
            else:
                kept[key] = value
        return kept, {"weights_id": self.weights_id, "tensors": referenced}

    def restore(self, state: Mapping[str, Any], refs: Mapping[str, Any] | None) -> dict:
        """The whole state again: the referenced tensors from the rebuilt strategy, each verified by digest."""
        state = dict(state)
        if not refs or not refs.get("tensors"):
            return state
        if refs.get("weights_id") != self.weights_id:
            raise BackboneError(
                f"the checkpoint was made with backbone weights {refs.get('weights_id')} but this run loads "
                f"{self.weights_id}: point backbone.weights at the original file, or start a fresh run "
                f"(another results_root)")
        current = self.module.state_dict()
        for key, digest in refs["tensors"].items():
            if key not in current or self.built.get(key) != digest:
                raise BackboneError(
                    f"the checkpoint refers to the frozen tensor {key!r} with digest {digest}, but the rebuilt model "
                    f"{'lacks it' if key not in current else 'differs'}: the code or weights changed since the run "
                    f"started; start a fresh run (another results_root)")
            state[key] = current[key].detach().clone()
        return state

"""Training-FLOP counting from the layers actually run (torch.utils.flop_counter), for SparCL / DER++ costs.

WHY counted, not estimated from a formula: DER++ runs extra buffer forwards/backwards; counting one real
training step (forward + backward) captures whatever the strategy runs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of everything `step()` runs, counted by FlopCounterMode; a scalar loss it returns is also backpropagated."""
    with FlopCounterMode(display=False) as counter:
        out = step()
        if isinstance(out, torch.Tensor) and out.requires_grad and out.numel() == 1:
            out.backward()
    return int(counter.get_total_flops())


def sparse_flops(dense_flops: int, density: float) -> int:
    """Analytic FLOPs of masked layers at weight density `density` (SparCL counts savings analytically)."""
    return int(round(dense_flops * float(density)))


def _layer_counts(counts: dict, path: str) -> tuple[int, int]:
    """(forward, backward) FLOPs FlopCounterMode attributed to the module at `path` (keys are `Root.path`)."""
    for key, ops in counts.items():
        if key == path or key.endswith("." + path):
            fwd = sum(v for op, v in ops.items() if "backward" not in str(op))
            bwd = sum(v for op, v in ops.items() if "backward" in str(op))
            return int(fwd), int(bwd)
    raise KeyError(f"FlopCounterMode saw no module '{path}' run")


class TrainFlopMeter:
    """Training FLOPs, dense and at the layers' current densities, accumulated step by step.

    `probe` runs one forward + backward of one image under FlopCounterMode (eval mode, so no BatchNorm statistic
    moves; the parameters' .grad are restored afterwards) and keeps the per-image total and, for each sparsifiable
    layer, its forward FLOPs F and backward FLOPs B. Conv/linear FLOPs are linear in the batch, so a step that
    forwards and backpropagates n images costs n times the per-image count. WHY the probe and not a formula:
    whatever the strategy runs (buffer forwards, heads) is counted as run.

    Sparse cost of a layer with weight density d and weight-gradient density g (SparCL's accounting, where a
    sparse kernel skips the zeros): forward F*d, input gradient (B - F)*d, weight gradient F*g (the weight
    gradient of a conv costs as much as its forward; a layer whose input needs no gradient has B = F).
    """

    def __init__(self) -> None:
        self.per_image: int | None = None
        self.layers: list[tuple[int, int]] = []
        self.total = 0
        self.total_dense = 0

    def probe(self, root: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x1: torch.Tensor,
              layer_paths: list[str]) -> None:
        params = [p for p in root.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        modes = {m: m.training for m in root.modules()}
        root.eval()
        try:
            with torch.enable_grad(), FlopCounterMode(display=False) as counter:
                forward(x1[:1]).float().sum().backward()
        finally:
            for p, g in zip(params, saved):
                p.grad = g
            for m, mode in modes.items():
                m.training = mode
        counts = counter.get_flop_counts()
        self.per_image = int(counter.get_total_flops())
        self.layers = [_layer_counts(counts, path) for path in layer_paths]

    def add(self, n_images: int, weight_density: list[float] | None = None,
            grad_density: list[float] | None = None) -> None:
        """One step over `n_images` images; densities per probed layer (None: dense)."""
        dense = n_images * self.per_image
        saved = 0.0
        if weight_density is not None:
            for (f, b), d, g in zip(self.layers, weight_density, grad_density or weight_density):
                saved += b * (1.0 - d) + f * (1.0 - g)  # F(1-d) + (B-F)(1-d) + F(1-g)
        self.total_dense += dense
        self.total += int(round(dense - n_images * saved))

    def state(self) -> dict:
        return {"total": self.total, "total_dense": self.total_dense}

    def load(self, state: dict) -> None:
        self.total, self.total_dense = int(state["total"]), int(state["total_dense"])

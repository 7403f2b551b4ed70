"""View-wise batch norm: V views of a batch in ONE forward pass, each normalised as if it ran alone.

A batch-statistics BN over a [V*B, ...] input pools its mean and variance over all V*B samples, so V augmented
views stacked into one batch are NOT the same as V separate passes (CoTTA's reference runs its 32 teacher views
one pass each, qinenergy/cotta cifar/cotta.py:103-105; issue 19, defect 2). Inside

    with viewwise_bn(model, views=V):
        out = model(x)            # x: [V*B, ...], rows v*B..(v+1)*B are view v

every `_BatchNorm` of `model` that normalises with batch statistics normalises each view's B-chunk with that
chunk's own mean and (biased) variance, so `out` equals `torch.cat([model(x_v) for x_v in x.chunk(V)])` (tested
to 1e-5, forward and gradients). Modules that normalise with running statistics (eval mode with tracked
statistics) do not depend on the batch, so they run unchanged. Running statistics, where a module keeps and
updates them (train mode, `track_running_stats`, buffers present), receive V successive momentum updates with
each view's statistics (unbiased variance), in view order, and `num_batches_tracked` grows by V: what V separate
passes would leave. CoTTA's and PSMT's modules keep no running statistics (reference `configure_model`:
`track_running_stats = False`, `running_mean = None`), so there nothing is updated, as in the reference.

Two exact implementations (`impl`): the native kernel once per view chunk (CPU default), or one `var_mean`
reduction and one fused multiply-add per BN (CUDA default); both are differentiable (PSMT's student runs its
plain and augmented batches through it). Other layers of the
model must be per-sample (convs, linear, LayerNorm/GroupNorm): anything else that mixes samples is not split.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn as nn

__all__ = ["viewwise_bn", "viewwise_batch_norm"]


def _uses_batch_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    # as _BatchNorm.forward: batch statistics in training mode, or when no running statistics are kept
    return bn.training or (bn.running_mean is None and bn.running_var is None)


def _updates_running_stats(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None


IMPLS = ("auto", "loop", "fused")


def viewwise_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, views: int,
                        impl: str = "auto") -> torch.Tensor:
    """`bn(x)` with each of the `views` consecutive chunks of x's batch normalised by its own statistics.

    impl "loop": the native batch-norm kernel once per chunk (contiguous slices), outputs concatenated; running
    statistics updated by the kernel, chunk after chunk, exactly as V passes. "fused": one `var_mean` reduction
    over [V, B, C, HW] and one multiply-add (x * scale + shift, PyTorch's own CPU formula). "auto": fused on
    CUDA (2 kernels per BN instead of 2V launches), loop elsewhere (the native CPU kernel is the faster there)."""
    if views == 1 or not _uses_batch_stats(bn):
        return type(bn).forward(bn, x)
    if x.dim() < 2 or x.shape[0] % views:
        raise ValueError(f"viewwise_bn: a batch of {x.shape[0]} is not {views} equal views; stack the views "
                         "along the batch dimension (view v = rows v*B..(v+1)*B)")
    if impl == "auto":
        impl = "fused" if x.is_cuda else "loop"
    if impl == "loop":
        return torch.cat([type(bn).forward(bn, chunk) for chunk in x.chunk(views)])
    if impl != "fused":
        raise ValueError(f"viewwise_bn: impl must be one of {IMPLS}, got {impl!r}")
    n, c = x.shape[0] // views, x.shape[1]
    xv = x.reshape(views, n, c, -1)
    var, mean = torch.var_mean(xv, dim=(1, 3), unbiased=False, keepdim=True)  # [V, 1, C, 1]
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.view(1, 1, c, 1)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.view(1, 1, c, 1)
    if _updates_running_stats(bn):
        _update_running_stats(bn, mean.detach(), var.detach(), xv.shape[1] * xv.shape[3])
    return torch.addcmul(shift, xv, scale).reshape(x.shape)


@torch.no_grad()
def _update_running_stats(bn, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """V successive updates, one per view, as `_BatchNorm.forward` does once per pass."""
    unbiased = var * (count / max(count - 1, 1))
    for v in range(mean.shape[0]):
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        f = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
        bn.running_mean.lerp_(mean[v].flatten().to(bn.running_mean.dtype), f)
        bn.running_var.lerp_(unbiased[v].flatten().to(bn.running_var.dtype), f)


@contextlib.contextmanager
def viewwise_bn(model: nn.Module, views: int, impl: str = "auto"):
    """Within the block, every BatchNorm of `model` normalises `views` stacked views separately (module doc).

    impl: "auto" | "loop" | "fused" (`viewwise_batch_norm`). Works with `torch.func.functional_call(model, params, ...)` (the patched forward reads the module's current
    parameters). views == 1 changes nothing."""
    views = int(views)
    if views < 1:
        raise ValueError(f"viewwise_bn: views must be >= 1, got {views}")
    if impl not in IMPLS:
        raise ValueError(f"viewwise_bn: impl must be one of {IMPLS}, got {impl!r}")
    if views == 1:
        yield model
        return
    patched = []
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                patched.append((m, m.__dict__.get("forward")))
                m.forward = types.MethodType(lambda self, x: viewwise_batch_norm(self, x, views, impl), m)
        yield model
    finally:
        for m, old in patched:
            if old is None:
                del m.forward
            else:
                m.forward = old

"""Python side of csrc/: each fused kernel with its PyTorch reference, and the lazy extension loader.

    mean_teacher_update_(off, on, src, decay, restore_prob, seed, mask=None, impl="auto")

One pass over flat float32 buffers: off <- lerp(off, on, 1 - decay) (the EMA), then each element of `on` is
reset to `src` where a counter-based uniform u(seed, i) < restore_prob (and mask[i], an optional Fisher mask).
The uniform is a 32-bit integer hash of (seed, index), the same in the reference and in the C++/CUDA kernels,
so the two agree exactly on which elements are restored (tests compare them on random inputs).

The extension (csrc/mean_teacher.cpp, plus csrc/mean_teacher.cu when nvcc and a GPU are there) is built on
first use with torch.utils.cpp_extension.load (ninja) into CLBENCH_EXT_DIR (default ~/.cache/clbench/ext), so
a session builds it once; it registers the operator torch.ops.clbench.mean_teacher_update. impl="torch" forces the reference, "ext" the extension, "auto" (default) the
extension when CLBENCH_OPS=ext is set and it builds, else the reference. Why not the extension by default:
on CPU it must beat the reference by >= 1.3x to stay (see docs/speed.md for the measured ratio).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["mean_teacher_update_", "mean_teacher_update_ref", "hash_uniform", "load_extension"]

_CSRC = Path(__file__).resolve().parents[2] / "csrc"
_EXT = None
_EXT_ERROR: str | None = None
_M32 = 0xFFFFFFFF
IMPLS = ("auto", "torch", "ext")


def hash_uniform(seed: int, n: int, device=None) -> torch.Tensor:
    """u(seed, i) in [0, 1) for i < n: the kernels' counter-based draw (float32, 24-bit resolution)."""
    x = torch.arange(n, dtype=torch.int64, device=device)
    x = (x * 0x9E3779B9 + (int(seed) & _M32)) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    x = x ^ (x >> 16)
    return (x >> 8).to(torch.float32) * (1.0 / 16777216.0)


@torch.no_grad()
def mean_teacher_update_ref(off: torch.Tensor, on: torch.Tensor, src: torch.Tensor | None, decay: float,
                            restore_prob: float, seed: int, mask: torch.Tensor | None = None) -> None:
    """The PyTorch reference (best of the per-tensor loop, _foreach_lerp_ and one flat lerp: a flat lerp)."""
    off.lerp_(on, 1.0 - decay)
    if restore_prob > 0:
        hit = hash_uniform(seed, on.numel(), on.device) < restore_prob
        if mask is not None:
            hit &= mask
        on.copy_(torch.where(hit, src, on))


def load_extension(verbose: bool = False):
    """The compiled operator `torch.ops.clbench.mean_teacher_update`, built on first call (ninja); None with the
    reason in `extension_error()` (no compiler, no ninja).

    Built with the fewest flags that keep the kernel fast (-O2, no debug info) from ATen's core headers only
    (csrc/mean_teacher.cpp registers a TORCH_LIBRARY operator, no pybind11 module), and from the CPU source
    alone when there is no GPU: the cold CPU build is what CI pays once per test session (tests/test_ops.py)."""
    global _EXT, _EXT_ERROR
    if _EXT is not None or _EXT_ERROR is not None:
        return _EXT
    try:  # registered already in this process (one library may register the namespace once)
        _EXT = torch.ops.clbench.mean_teacher_update
        return _EXT
    except (AttributeError, RuntimeError):
        pass
    try:
        from torch.utils.cpp_extension import load
        sources = [str(_CSRC / "mean_teacher.cpp")]
        cuda = torch.cuda.is_available() and os.environ.get("CLBENCH_OPS_CUDA", "1") != "0"
        if cuda:
            sources.append(str(_CSRC / "mean_teacher.cu"))
        name = "clbench_ops_cuda" if cuda else "clbench_ops_cpu"
        build = Path(os.environ.get("CLBENCH_EXT_DIR", Path.home() / ".cache" / "clbench" / "ext")) / name
        build.mkdir(parents=True, exist_ok=True)
        load(name=name, sources=sources, extra_cflags=["-O3", "-fopenmp", "-g0"], extra_ldflags=["-fopenmp"],
             extra_cuda_cflags=["-O2"] if cuda else None, build_directory=str(build), verbose=verbose,
             is_python_module=False)
        _EXT = torch.ops.clbench.mean_teacher_update
    except Exception as e:  # no compiler, no ninja: the reference is used
        _EXT_ERROR = f"{type(e).__name__}: {e}".splitlines()[0]
    return _EXT


def extension_error() -> str | None:
    return _EXT_ERROR


@torch.no_grad()
def mean_teacher_update_(off: torch.Tensor, on: torch.Tensor, src: torch.Tensor | None, decay: float,
                         restore_prob: float = 0.0, seed: int = 0, mask: torch.Tensor | None = None,
                         impl: str = "auto") -> str:
    """Fused EMA + stochastic restore on flat buffers (see module doc); returns the implementation used."""
    if restore_prob > 0 and src is None:
        raise ValueError("mean_teacher_update_: restore_prob > 0 needs a source buffer")
    if impl not in IMPLS:
        raise ValueError(f"mean_teacher_update_: impl must be one of {IMPLS}, got {impl!r}")
    use_ext = impl == "ext" or (impl == "auto" and os.environ.get("CLBENCH_OPS") == "ext")
    fits = off.dtype == torch.float32 and on.dtype == torch.float32 and off.is_contiguous() \
        and on.is_contiguous() and (src is None or (src.dtype == torch.float32 and src.is_contiguous()))
    if impl == "ext" and not fits:
        raise ValueError("mean_teacher_update_(impl='ext') needs contiguous float32 buffers: pass flat "
                         "buffers (cl.models.ema.MeanTeacher keeps them) or impl='torch'")
    if use_ext and fits:
        ext = load_extension()
        if ext is not None:
            empty = off.new_empty(0)
            m = mask.contiguous() if mask is not None else empty.bool()
            ext(off, on, src if src is not None else empty, m, float(decay), float(restore_prob), int(seed))
            return "ext"
        if impl == "ext":
            raise RuntimeError(f"clbench_ops extension did not build: {_EXT_ERROR}")
    mean_teacher_update_ref(off, on, src, decay, restore_prob, seed, mask)
    return "torch"

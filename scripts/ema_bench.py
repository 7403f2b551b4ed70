#!/usr/bin/env python
"""Mean-teacher update timings (issue 10): per-tensor loop vs `torch._foreach_lerp_` vs one flat lerp vs the
fused C++/CUDA kernel (csrc/, `impl="ext"`), on the parameter shapes of real models, printed as ratios to the
per-tensor loop.

    python scripts/ema_bench.py [--device cpu|cuda] [--models vit-tiny,vit-ti16] [--repeats 20] [--restore 0.01]
                                [--threads 1]

Models (random init, only their parameter shapes matter): `vit-tiny` the test backbone (timm ViT, 32 px, 4 blocks
of width 128, 0.81M parameters), `vit-ti16` timm's ViT-Ti/16 at 224 px (5.7M), `vit-b16` ViT-B/16 (86M; the
issue's GPU figure). Two operations: the EMA alone (LAE; CoTTA's teacher) and a CoTTA step (EMA, then restore
with p = --restore toward the source). The loop and foreach rows restore per tensor with `torch.rand` (CoTTA's
reference), "flat" is `MeanTeacher(impl="torch")` (flat lerp, per-tensor `torch.rand` restore), "ext" is
`MeanTeacher(impl="ext")` (one fused pass; hash restore). The kernel is built before timing (the build is
reported apart: cold it takes seconds to a minute, cached milliseconds).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cl.models import ops  # noqa: E402
from cl.models.ema import MeanTeacher  # noqa: E402

MODELS = {
    "vit-tiny": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),
    "vit-ti16": dict(),
    "vit-b16": dict(embed_dim=768, depth=12, num_heads=12),
}


def shapes(model: str) -> list[torch.Size]:
    import timm
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODELS[model])
    return [p.shape for p in net.parameters()]


def timed(fn, repeats: int, sync) -> float:
    fn()
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def bench(model: str, device: torch.device, repeats: int, restore: float, out=print) -> dict[str, float]:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sh = shapes(model)
    n = sum(s.numel() for s in sh)
    g = torch.Generator(device=device).manual_seed(0)
    fresh = lambda: [torch.randn(s, device=device, generator=g) for s in sh]  # noqa: E731
    res: dict[str, float] = {}
    for op, p in (("ema", 0.0), ("step", restore)):
        decay = 0.999
        on, off, src = fresh(), fresh(), fresh()

        def loop():
            with torch.no_grad():
                for o, x in zip(off, on):
                    o.lerp_(x, 1 - decay)
                if p > 0:
                    for x, s in zip(on, src):
                        x.copy_(torch.where(torch.rand(x.shape, device=device) < p, s, x))

        def foreach():
            with torch.no_grad():
                torch._foreach_lerp_(off, on, 1 - decay)
                if p > 0:
                    for x, s in zip(on, src):
                        x.copy_(torch.where(torch.rand(x.shape, device=device) < p, s, x))

        res[f"{op} loop"] = timed(loop, repeats, sync)
        res[f"{op} foreach"] = timed(foreach, repeats, sync)
        flat = MeanTeacher(fresh(), decay=decay, restore_prob=p, impl="torch")
        res[f"{op} flat"] = timed(flat.step, repeats, sync)
        if ops.load_extension() is not None:
            ext = MeanTeacher(fresh(), decay=decay, restore_prob=p, impl="ext")
            res[f"{op} ext"] = timed(ext.step, repeats, sync)
        base = res[f"{op} loop"]
        cells = " | ".join(f"{k.split()[1]} {v:.2f} ms ratio {base / v:.2f}" for k, v in res.items()
                           if k.startswith(op + " "))
        what = "EMA only" if p == 0 else f"EMA + restore p={p}"
        out(f"ema {model} n={n / 1e6:.2f}M {len(sh)} tensors on {device.type}, {what}: {cells}")
    return res


def main(argv=None, out=print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="vit-tiny,vit-ti16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--restore", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch and the kernel (1: stable ratios on a shared machine; 0: torch's default)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    built = ops.load_extension()
    cached = os.environ.get("CLBENCH_EXT_DIR", "~/.cache/clbench/ext")
    out(f"ema kernel build (or cache hit in {cached}): {time.perf_counter() - t0:.1f} s"
        + ("" if built is not None else f" - not built: {ops.extension_error()}"))
    out(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    for m in args.models.split(","):
        bench(m.strip(), device, args.repeats, args.restore, out=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

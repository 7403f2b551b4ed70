"""CoSO optimiser step time, exact vs fast subspaces, on random gradients of the target shapes.

    python scripts/coso_step_time.py --dim 768 --layers 12 --proj-rank 50 --sketch-rank 120   # ViT-B/16 attn.proj
    python scripts/coso_step_time.py --dim 192 --layers 4 --proj-rank 8 --sketch-rank 16      # test size
Times the optimiser step alone (projection, SVD, FD merge, Adam); the forward/backward are not included.
"""
import argparse
import time

import torch

from cl.subspace import CoSOAdam


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--proj-rank", type=int, default=50)
    ap.add_argument("--sketch-rank", type=int, default=120)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    for mode in ("exact", "fast"):
        torch.manual_seed(0)
        ws = [torch.nn.Parameter(torch.randn(a.dim, a.dim)) for _ in range(a.layers)]
        opt = CoSOAdam([{"params": ws, "subspace": True, "proj_rank": a.proj_rank, "sketch_rank": a.sketch_rank,
                         "svd": mode}], lr=1e-4)
        times = []
        for _ in range(a.steps + 1):
            for w in ws:
                w.grad = torch.randn(a.dim, a.dim)
            t = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t)
        print(f"{mode}: {1000 * sum(times[1:]) / a.steps:.1f} ms per optimiser step "
              f"({a.layers} x {a.dim}x{a.dim}, r1={a.proj_rank}, r2={a.sketch_rank}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()

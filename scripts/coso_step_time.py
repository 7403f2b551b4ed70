"""CoSO training-step time, exact vs fast subspaces, as a ratio to a plain finetune step in the same process.

    python scripts/coso_step_time.py --model vit-b16 --batch 8           # ViT-B/16 at 224 px, r1 50, r2 120
    python scripts/coso_step_time.py --model vit-tiny --batch 16 --proj-rank 8 --sketch-rank 16   # test size
    python scripts/coso_step_time.py --model vit-b16 --device cuda --batch 128 --bf16   # on a GPU

One step = forward, cross-entropy, backward and optimiser step on random images (a randomly initialised timm ViT:
the weights do not change the cost). finetune: torch.optim.Adam on every parameter and the head. coso: the frozen
ViT except every attn.proj weight and the head, `cl.models.subspace.CoSOAdam` with the given ranks (K = 1, an SVD refresh
every step), `exact` and `fast`. The optimiser step alone is timed as well. Prints one line per method and the
ratios; times are medians over --steps steps after --warmup.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F

from cl.models.subspace import CoSOAdam

MODELS = {
    "vit-b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit-tiny": dict(img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4),  # configs/backbone/vit-tiny
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(method: str, a, device: torch.device) -> tuple[float, float]:
    """(median step ms, median optimiser-step ms) of one method."""
    torch.manual_seed(0)
    spec = MODELS[a.model]
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=a.classes, **spec).to(device)
    x = torch.rand(a.batch, 3, spec["img_size"], spec["img_size"], device=device)
    y = torch.randint(0, a.classes, (a.batch,), device=device)
    if method == "finetune":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    else:
        model.requires_grad_(False)
        weights = [m.weight for n, m in model.named_modules() if n.endswith("attn.proj")]
        head = list(model.head.parameters())
        for p in weights + head:
            p.requires_grad_(True)
        opt = CoSOAdam([{"params": weights, "subspace": True, "proj_rank": a.proj_rank,
                         "sketch_rank": a.sketch_rank, "svd": method.split("-")[1]},
                        {"params": head}], lr=1e-4)
    dtype = torch.bfloat16 if a.bf16 else None
    steps, opt_steps = [], []
    for i in range(a.warmup + a.steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync(device)
        t1 = time.perf_counter()
        opt.step()
        sync(device)
        t2 = time.perf_counter()
        if i >= a.warmup:
            steps.append(1000 * (t2 - t0))
            opt_steps.append(1000 * (t2 - t1))
    return statistics.median(steps), statistics.median(opt_steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=sorted(MODELS), default="vit-b16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--proj-rank", type=int, default=50)
    ap.add_argument("--sketch-rank", type=int, default=120)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for forward/backward (the trainer's on CUDA)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{a.model}, batch {a.batch}, r1={a.proj_rank}, r2={a.sketch_rank}, K=1, {name}, torch {torch.__version__}")
    results = {m: time_steps(m, a, device) for m in ("finetune", "coso-exact", "coso-fast")}
    base = results["finetune"][0]
    for m, (step, opt) in results.items():
        print(f"{m:11s} step {step:9.1f} ms  ({step / base:5.2f} x finetune)   optimiser step {opt:9.1f} ms")


if __name__ == "__main__":
    main()

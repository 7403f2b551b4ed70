"""Per-batch time of CoTTA's teacher on V augmented views: the exact view-wise pass against V sequential passes
(the reference's loop) and against the old pooled pass, as ratios measured in one process (issue 19).

    .venv/bin/python scripts/viewwise_bench.py [--model synthetic-c|wrn28] [--width 10] [--batch 50] [--views 32]
                                               [--size 16] [--repeats 5] [--device cpu]

The teacher runs as in `strategies.cotta.teacher_pseudo_labels`: BN on batch statistics, no gradient, a random
initialisation of the architecture (timing does not depend on the weights). Each repeat times the three modes in
turn on the same views; the medians are printed, and the view-wise output's largest difference from the
sequential one (the exactness the tests assert to 1e-5).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build(model: str, width: int, n_classes: int = 10):
    if model == "synthetic-c":
        from cl.app.testbeds.synthetic_c import SmallResNet
        return SmallResNet(n_classes=n_classes)
    if model == "wrn28":
        from cl.models.backbones_robustbench import ARCHS
        return ARCHS["wrn-28-10"]({"arch": "wrn-28-10", "depth": 28, "widen_factor": width, "n_classes": n_classes,
                                   "input_size": 32, "in_chans": 3, "normalize": "none", "pretrained": False})
    raise SystemExit(f"--model must be synthetic-c or wrn28, got {model!r}")


def main(argv=None) -> None:
    import torch

    from strategies.cotta import augment_views, views_forward
    from strategies.tta_base import use_batch_stats

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic-c")
    ap.add_argument("--width", type=int, default=10, help="WRN-28 widen factor (--model wrn28)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build(args.model, args.width).to(dev)
    use_batch_stats(model)
    x = torch.rand(args.batch, 3, args.size, args.size, device=dev)
    views = augment_views(x, args.views)

    def run(mode):
        with torch.no_grad():
            out = views_forward(model, model, views, args.views, mode)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    modes = ("viewwise", "sequential", "pooled")
    outs = {m: run(m) for m in modes}  # warm-up
    times = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m in modes:
            t = time.perf_counter()
            run(m)
            times[m].append(time.perf_counter() - t)
    med = {m: statistics.median(v) for m, v in times.items()}
    diff = (outs["viewwise"] - outs["sequential"]).abs().max().item()
    pooled_diff = (outs["pooled"] - outs["sequential"]).abs().max().item()
    print(f"model={args.model}{'' if args.model != 'wrn28' else f' width={args.width}'} batch={args.batch} "
          f"views={args.views} size={args.size} device={dev} repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print("| pass | median s per batch | ratio to view-wise |")
    print("|---|---|---|")
    for m in modes:
        print(f"| {m} | {med[m]:.4f} | {med[m] / med['viewwise']:.2f} |")
    print(f"view-wise vs sequential max |diff| {diff:.2e}; pooled vs sequential {pooled_diff:.2e}")


if __name__ == "__main__":
    main()

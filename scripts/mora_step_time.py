"""MoRA step time on CPU, with and without the experts, measured in the same process (ratios, not absolutes).

    .venv/bin/python scripts/mora_step_time.py [--batch 64] [--reps 10] [--tasks 1 10]

Variants, each on clip-tiny (both towers, 9 class prompts, a batch of 32 px images):
  none      frozen CLIP: forward of image + text towers and the MoRA loss, no backward (nothing to train)
  lora      the same experts with routing off (w = 1: a plain rank-R LoRA), forward + backward + AdamW step
  mora      MoRA's self-activated routing (normalise, top-k, softmax; threshold off while training), same step
and the evaluation forward (predict, threshold on) for none / mora. R = rank x tasks experts per layer.

    .venv/bin/python scripts/mora_step_time.py --layer [--tokens 1576] [--threads 1]

times ONE adapted Linear at ViT-B/16's widths instead (768 -> 768 as q/k/v/out, 768 -> 3072 as FFN in; tokens =
batch 8 x 197 by default), random weights: the frozen Linear against MoRA's layer, in training (forward + backward
to the input, plus A/B for mora, as in a middle layer) and in evaluation (forward, threshold on), so the expert
overhead at the paper's width needs no CLIP weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _build(tasks: int, rank: int, plain: bool = False, experts: bool = True):
    import scenarios
    import strategies
    from cl.app.registry import build_backbone as build
    from cl.app.cli import compose_config
    from strategies import mora as mora_mod

    cfg = compose_config(["strategy=mora", "scenario=synthetic-xtail", "backbone=clip-tiny",  # timing: random weights
                          "scenario.limit_per_class=2", "trainer.device=cpu", f"strategy.rank={rank}", f"strategy.topk={rank}"])
    stream = scenarios.build(cfg["scenario"])
    torch.manual_seed(0)
    s = strategies.build(cfg["strategy"], build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    if plain:  # routing off: every expert weighted 1
        for layer in s.experts:
            layer.gate = lambda z: torch.ones_like(z)
    if experts:
        for t in range(tasks):
            s.observe_classes(stream[t % len(stream)])
            params = s.begin_experience(stream[t % len(stream)])
            with torch.no_grad():
                for layer in s.experts:
                    layer.B.normal_(std=0.02)  # trained-like values, so old experts contribute
    else:
        s.observe_classes(stream[0])
        params = []
        s._current = torch.as_tensor(list(stream[0].classes))
        s._position = torch.full((stream.info.n_classes,), -1, dtype=torch.long)
        s._position[s._current] = torch.arange(len(s._current))
        s._n_seen = 0
    return s, params, stream


def _time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_times(tokens: int, rank: int, tasks_list, reps: int) -> None:
    """One Linear at ViT-B/16 widths: frozen Linear vs RankOneExperts (R = rank x tasks), train and eval."""
    from torch import nn

    from strategies.mora import RankOneExperts

    torch.manual_seed(0)
    for d_in, d_out, what in ((768, 768, "q/k/v/out 768->768"), (768, 3072, "FFN in 768->3072")):
        x = torch.randn(tokens, d_in)
        base = nn.Linear(d_in, d_out).requires_grad_(False)
        xg = x.clone().requires_grad_(True)  # a middle layer: training also needs the input gradient

        def frozen_train():
            xg.grad = None
            base(xg).sum().backward()

        plain, plain_train = _time(lambda: base(x), reps), _time(frozen_train, reps)
        for tasks in tasks_list:
            layer = RankOneExperts(base, topk=rank, temperature=0.01, threshold=0.2)
            for _ in range(tasks):
                layer.add_task(rank)
                with torch.no_grad():
                    layer.B.normal_(std=0.02)

            def train():
                layer.train()
                xg.grad = layer.A.grad = layer.B.grad = None
                layer(xg).sum().backward()

            def evaluate():
                layer.eval()
                with torch.no_grad():
                    layer(x)

            t_train, t_eval = _time(train, reps), _time(evaluate, reps)
            print(f"{what}, tokens {tokens}, R={tasks * rank}: train fwd+bwd frozen {plain_train * 1e3:.1f} ms, "
                  f"mora {t_train * 1e3:.1f} ms ({t_train / plain_train:.2f}x); eval frozen {plain * 1e3:.1f} ms, "
                  f"mora {t_eval * 1e3:.1f} ms ({t_eval / plain:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tasks", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--layer", action="store_true", help="one Linear at ViT-B/16 widths instead of clip-tiny")
    ap.add_argument("--tokens", type=int, default=8 * 197)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.layer:
        print(f"cpu threads {torch.get_num_threads()}, rank {args.rank}, median of {args.reps}")
        return layer_times(args.tokens, args.rank, args.tasks, args.reps)
    from cl.engine.strategy import Batch

    x = torch.rand(args.batch, 3, 32, 32)
    print(f"cpu threads {torch.get_num_threads()}, batch {args.batch}, rank {args.rank}, median of {args.reps}")
    none, _, stream = _build(0, args.rank, experts=False)
    y = torch.as_tensor(list(stream[0].classes)).repeat(args.batch)[: args.batch]

    def fwd_only(s):
        def f():
            with torch.no_grad():
                s.train()
                s.train_step(Batch(x, y))
        return f

    def step(s, params):
        opt = torch.optim.AdamW(params, lr=5e-4)

        def f():
            s.train()
            loss = s.train_step(Batch(x, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return f

    def pred(s):
        def f():
            s.eval()
            s._text_cache = None
            s.predict(x)
        return f

    t_none, p_none = _time(fwd_only(none), args.reps), _time(pred(none), args.reps)
    print(f"none: train forward {t_none * 1e3:.1f} ms, eval forward {p_none * 1e3:.1f} ms")
    for tasks in args.tasks:
        lora, lp, _ = _build(tasks, args.rank, plain=True)
        mora, mp, _ = _build(tasks, args.rank)
        t_lora, t_mora = _time(step(lora, lp), args.reps), _time(step(mora, mp), args.reps)
        f_mora, p_mora = _time(fwd_only(mora), args.reps), _time(pred(mora), args.reps)
        print(f"tasks {tasks} (R={tasks * args.rank}): mora step {t_mora * 1e3:.1f} ms, plain-LoRA step "
              f"{t_lora * 1e3:.1f} ms (mora/lora {t_mora / t_lora:.2f}); train forward mora/none "
              f"{f_mora / t_none:.2f}; eval forward mora/none {p_mora / p_none:.2f}")


if __name__ == "__main__":
    main()

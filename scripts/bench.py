"""Speed benchmark (issue 10): how close the strategies come to what the hardware allows, in one process.

    python scripts/bench.py            # GPU: ViT-B/16 (random init), 200 classes x (20 train, 5 test), 10 tasks, 224 px
    python scripts/bench.py --cpu      # test size: vit-tiny, 12 classes x (8 train, 4 test), 3 tasks, 32 px
    python scripts/bench.py --cpu --strategies simplecil --ceiling-steps 3   # a quick look
    python scripts/bench.py --cpu --compile   # also the ceiling step under torch.compile (CPU inductor: minutes)

Lines (each carries the word `ratio`):
- `ceiling`: a plain adapter-tuning step (AdaptFormer adapters in every block, bottleneck 16, a linear head, CE,
  SGD; the trainer's precision) on the same backbone and batch size as the strategies' training, on device-resident
  tensors: what a training step costs with nothing else in the way; and a no-grad forward (the eval ceiling).
- one line per strategy (mos, adam, simplecil): a whole run through `run_experiment` on the synthetic stream,
  with its training images/s (over the experiences that train) and its ratio to the ceiling, evaluation images/s
  and its ratio to the forward ceiling, seconds per experience, the whole run's wall time, peak memory.
- `mos-eval`: MOS's T-set test-time inference on one evaluation batch, sequential (T backbone passes) vs batched
  across the adapter sets (one pass over a T x batch; strategies/mos.py), T = the stream's number of tasks.
- `loader`: the evaluation loader's images/s over an ImageFolder tree of JPEGs (made here: ImageNet-R-sized
  400 x 300 images on the GPU settings, 96 x 72 with --cpu), reading the files vs the decode-once cache
  (`scenario.image_cache=exact`, the ImageFolder benchmarks' default; the cache's one-off build is timed apart).
- `compile` (with --compile): the ceiling step with `torch.compile` on forward + loss, vs eager; compile time apart.
- `ema-kernel`: the fused mean-teacher update (csrc/, EMA + restore p = 0.01) against its best PyTorch reference
  (one flat lerp + torch.rand restore) on a flat buffer of ViT-B/16's size (86M; --cpu: ViT-Ti/16's 5.7M), when the
  extension builds (ninja and a compiler), else the reference alone. The build (cold: ~10-15 s on 2 cores,
  cached: ms) happens before any timing and is printed on its own `ema-build` line, outside the budget.
`--cpu` keeps the same lines at test size; it must finish in < 5 minutes on an idle 2-core machine
(scripts/ema_bench.py has the per-tensor / foreach / flat / kernel EMA comparison).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU = {"backbone": "vit-b16", "classes": 200, "train": 20, "test": 5, "tasks": 10, "size": 224, "batch": 48,
       "epochs": None, "crct_epochs": None, "ema_numel": 86_000_000}
CPU = {"backbone": "vit-tiny", "classes": 12, "train": 8, "test": 4, "tasks": 3, "size": 32, "batch": 16,
       "epochs": 1, "crct_epochs": 1, "ema_numel": 5_700_000}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    from contextlib import nullcontext

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def _adapter_step_parts(backbone_cfg: dict, batch: int, device: torch.device):
    """The ceiling's pieces: frozen backbone with AdaptFormer adapters (bottleneck 16), a 200-way head, SGD over
    adapters + head, and one random device-resident batch."""
    from cl.app.registry import build_backbone
    from cl.models import peft

    bb = build_backbone(backbone_cfg).to(device)
    bb.requires_grad_(False)
    adapters = peft.add_adapters(bb.model, bottleneck=16, scale=0.1, dropout=0.1).to(device)
    head = torch.nn.Linear(bb.feature_dim, 200).to(device)
    params = [*adapters.parameters(), *head.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    x = torch.rand(batch, bb.in_chans, bb.input_size, bb.input_size, device=device)
    y = torch.randint(0, 200, (batch,), device=device)
    return bb, head, opt, x, y


def ceilings(backbone_cfg: dict, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(adapter-step images/s, no-grad forward images/s) on random device-resident inputs."""
    bb, head, opt, x, y = _adapter_step_parts(backbone_cfg, batch, device)

    def step():
        with _autocast(device):
            loss = torch.nn.functional.cross_entropy(head(bb(x)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    bb.train()
    for _ in range(2):
        step()
    train = batch / _median_time(step, steps, device)
    bb.eval()
    xe = torch.rand(batch * 2, bb.in_chans, bb.input_size, bb.input_size, device=device)
    with torch.no_grad(), _autocast(device):
        bb(xe)
        forward = len(xe) / _median_time(lambda: bb(xe), steps, device)
    return train, forward


def _median_time(fn, n: int, device: torch.device) -> float:
    """Median seconds per call over n calls: robust to the other processes of a shared machine."""
    ts = []
    for _ in range(n):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def _overrides(name: str, s: dict, device: torch.device, results: Path) -> list[str]:
    over = [f"strategy={name}", "scenario=synthetic", f"backbone={s['backbone']}", f"results_root={results}",
            "trainer.progress=false", f"trainer.device={device.type}",
            f"scenario.synthetic.n_classes={s['classes']}", f"scenario.synthetic.train_per_class={s['train']}",
            f"scenario.synthetic.test_per_class={s['test']}", f"scenario.synthetic.image_size={s['size']}",
            f"scenario.init_cls={s['classes'] // s['tasks']}", f"scenario.increment={s['classes'] // s['tasks']}",
            f"trainer.batch_size={s['batch']}"]
    if s["backbone"] != "vit-tiny":
        over.append("backbone.pretrained=false")  # speed does not depend on the weights; nothing to download
    if s["epochs"] is not None:
        over.append(f"trainer.epochs={s['epochs']}")
    if s["crct_epochs"] is not None and name == "mos":
        over.append(f"strategy.crct_epochs={s['crct_epochs']}")
    return over


def run_strategy(name: str, s: dict, device: torch.device, results: Path) -> dict:
    from cl.app.cli import compose_config
    from cl.app.experiment import run_experiment

    cfg = compose_config(_overrides(name, s, device, results))
    t = time.perf_counter()
    path = run_experiment(cfg, out=lambda *a, **k: None)
    wall = time.perf_counter() - t
    result = json.loads(Path(path).read_text())
    per = result["costs"]["per_experience"]
    trained = [c for c in per if c["train_images"] and c["train_s"] > 0]
    train_ips = (sum(c["train_images"] for c in trained) / sum(c["train_s"] for c in trained)) if trained else None
    eval_images = sum(c["eval_images_per_s"] * c["eval_s"] for c in per if c["eval_images_per_s"])
    eval_ips = eval_images / max(sum(c["eval_s"] for c in per), 1e-9)
    import strategies

    sgd = getattr(strategies.get_class(name), "uses_sgd", True)
    return {"sgd": sgd, "train_ips": train_ips, "eval_ips": eval_ips, "s_per_exp": sum(c["wall_s"] for c in per) / len(per),
            "wall": wall, "mem": max(c["peak_memory_mb"] for c in per), "mem_kind": per[-1]["peak_memory_kind"],
            "last_acc": result["metrics"].get("last_acc")}


def ema_kernel(n: int, device: torch.device, repeats: int = 5) -> tuple[float | None, float]:
    """(kernel ms or None, best PyTorch ms) for EMA + restore p=0.01 of n float32 parameters on flat buffers.
    The PyTorch side is its fastest form: one flat lerp and a `torch.rand` restore (the hash reference of
    cl/models/ops.py draws the kernel's exact numbers but is much slower: it is for tests, not a baseline)."""
    from cl.models import ops

    off, on, src = (torch.randn(n, device=device) for _ in range(3))

    def torch_step(r):
        off.lerp_(on, 1 - 0.999)
        on.copy_(torch.where(torch.rand(n, device=device) < 0.01, src, on))

    def ext_step(r):
        ops.mean_teacher_update_(off, on, src, 0.999, 0.01, r, impl="ext")

    def best(fn):
        times = []
        for r in range(repeats + 1):
            _sync(device)
            t = time.perf_counter()
            fn(r)
            _sync(device)
            times.append(time.perf_counter() - t)
        return min(times[1:]) * 1e3

    ref = best(torch_step)
    ext = best(ext_step) if ops.load_extension() is not None else None
    return ext, ref


def mos_eval(s: dict, device: torch.device, repeats: int = 5) -> tuple[float, float, int]:
    """(sequential s, batched s, T) for one MOS `predict` on an evaluation batch with T = s['tasks'] stored sets
    (random adapters: the cost does not depend on their values)."""
    import scenarios
    import strategies
    from cl.app.registry import build_backbone
    from cl.app.cli import compose_config

    cfg = compose_config(_overrides("mos", s, device, Path(".")))
    stream = scenarios.build(cfg["scenario"])
    bb = build_backbone(cfg["backbone"])
    mos = strategies.build(cfg["strategy"], bb, stream.info, trainer=cfg["trainer"]).to(device)
    with torch.no_grad():
        for t in range(s["tasks"]):
            mos.observe_classes(stream[t])
            mos.begin_experience(stream[t])
            for p in mos.cur_adapter.parameters():
                p.normal_(0, 0.02)
            mos._store_adapter()
    mos.eval()
    x = torch.rand(mos.h["eval_batch_size"], bb.in_chans, bb.input_size, bb.input_size, device=device)

    def once(batched):
        mos.h["batched_eval"] = batched
        _sync(device)
        t = time.perf_counter()
        with _autocast(device):
            mos.predict(x)
        _sync(device)
        return time.perf_counter() - t

    once(False), once(True)  # warm-up
    # interleaved (sequential, batched) pairs, median of each: the ratio survives a shared machine's load swings
    pairs = [(once(False), once(True)) for _ in range(repeats)]
    seq, bat = (sorted(v)[len(v) // 2] for v in zip(*pairs))
    return seq, bat, s["tasks"]


def compiled_ceiling(backbone_cfg: dict, batch: int, steps: int, device: torch.device) -> tuple[float, float, float]:
    """(eager images/s, compiled images/s, compile s) of the ceiling's adapter step, forward + loss compiled."""
    bb, head, opt, x, y = _adapter_step_parts(backbone_cfg, batch, device)

    def loss_fn():
        with _autocast(device):
            return torch.nn.functional.cross_entropy(head(bb(x)).float(), y)

    compiled = torch.compile(loss_fn)

    def stepper(fn):
        def step():
            loss = fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    bb.train()
    t = time.perf_counter()
    compiled().backward()
    _sync(device)
    compile_s = time.perf_counter() - t
    se, sc = stepper(loss_fn), stepper(compiled)
    for _ in range(2):
        se(), sc()
    # interleaved eager / compiled steps, median of each (robust to load swings)
    pairs = [(_median_time(se, 1, device), _median_time(sc, 1, device)) for _ in range(steps)]
    te, tc = (sorted(v)[len(v) // 2] for v in zip(*pairs))
    eager, comp = batch / te, batch / tc
    return eager, comp, compile_s


def loader_speed(s: dict, folder: Path, n: int) -> tuple[float, float, float]:
    """(files images/s, cached images/s, build seconds) for the test transform over `n` generated JPEGs."""
    import os

    import numpy as np
    from PIL import Image

    from cl.engine import cache
    from cl.engine.data import make_loader
    from scenarios.datasets.imagefolder import ImageFolderDataset

    w, h = (96, 72) if s["size"] <= 64 else (400, 300)
    rng = np.random.default_rng(0)
    index = {}
    for c in range(4):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        index[f"c{c}"] = []
        for i in range(n // 4):
            p = folder / f"c{c}" / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p, quality=90)
            index[f"c{c}"].append(str(p))
    ds = ImageFolderDataset(folder, image_size=s["size"], train=False, index=index)

    def rate(dataset) -> float:
        t = time.perf_counter()
        count = sum(len(y) for _, y in make_loader(dataset, batch_size=s["batch"], shuffle=False, desc=None))
        return count / (time.perf_counter() - t)

    files = rate(ds)
    previous = os.environ.get("CLBENCH_CACHE_DIR")
    os.environ["CLBENCH_CACHE_DIR"] = str(folder / "cache")  # a throwaway cache, not the user's
    try:
        t = time.perf_counter()
        cache.attach_image_cache([ds], {"image_cache": "exact"}, log=lambda msg: None)
        built = time.perf_counter() - t
    finally:
        if previous is None:
            os.environ.pop("CLBENCH_CACHE_DIR")
        else:
            os.environ["CLBENCH_CACHE_DIR"] = previous
    return files, rate(ds), built


def main(argv=None, out=print) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="test size on the CPU (vit-tiny, small stream)")
    ap.add_argument("--strategies", default="mos,adam,simplecil")
    ap.add_argument("--ceiling-steps", type=int, default=None)
    ap.add_argument("--no-kernel", action="store_true", help="skip the EMA kernel lines")
    ap.add_argument("--compile", action="store_true", help="also time the ceiling step under torch.compile")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no GPU is visible: use --cpu for the test-size run")
    device = torch.device("cpu" if args.cpu else "cuda")
    if args.cpu:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    s = CPU if args.cpu else GPU
    from cl.app.cli import compose_config

    bcfg = compose_config([f"backbone={s['backbone']}", "trainer.device=cpu",
                           *([] if s["backbone"] == "vit-tiny" else ["backbone.pretrained=false"])])["backbone"]
    bcfg = {**bcfg, **({"kwargs": {**bcfg.get("kwargs", {}), "img_size": s["size"]}, "input_size": s["size"]}
                       if s["backbone"] == "vit-tiny" else {})}
    steps = args.ceiling_steps or (10 if args.cpu else 50)
    where = f"{s['backbone']} batch {s['batch']} {s['size']}px on {device.type}"
    if not args.no_kernel:  # build (or load from the cache) before anything is timed
        from cl.models import ops
        t = time.perf_counter()
        built = ops.load_extension() is not None
        out(f"ema-build {time.perf_counter() - t:.1f} s (not in any ratio; cold or cached) | "
            f"{'built' if built else 'not built: ' + str(ops.extension_error())}  ratio n/a")
    ceil_train, ceil_fwd = ceilings(bcfg, s["batch"], steps, device)
    out(f"ceiling  adapter step  {where}: {ceil_train:.1f} images/s  ratio 1.00 | no-grad forward "
        f"{ceil_fwd:.1f} images/s  ratio 1.00")
    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.strategies.split(",") if n]:
            r = run_strategy(name, s, device, Path(tmp))
            if not r["train_ips"]:
                train = "train none  ratio n/a"
            elif r["sgd"]:
                train = f"train {r['train_ips']:.1f} images/s  ratio {r['train_ips'] / ceil_train:.2f}"
            else:  # a strategy that does not train by SGD (SimpleCIL) only encodes: compare with the forward
                train = f"fit (no SGD) {r['train_ips']:.1f} images/s  ratio {r['train_ips'] / ceil_fwd:.2f} of forward"
            out(f"{name:9s} {where}, {s['tasks']} tasks: {train} | eval {r['eval_ips']:.1f} images/s  ratio "
                f"{r['eval_ips'] / ceil_fwd:.2f} | {r['s_per_exp']:.2f} s/experience | whole run {r['wall']:.1f} s | "
                f"peak memory {r['mem']:.0f} MB ({r['mem_kind']}) | last accuracy {r['last_acc']:.1f}%")
        n_images = 64 if args.cpu else 512
        files, cached, built = loader_speed(s, Path(tmp) / "images", n_images)
        out(f"loader    eval transform, {n_images} JPEGs, batch {s['batch']}: files {files:.0f} images/s | image cache "
            f"{cached:.0f} images/s  ratio {cached / files:.2f} (one-off build {built:.1f} s, not in the ratio)")
    if "mos" in args.strategies.split(","):
        seq, bat, n_sets = mos_eval(s, device)
        out(f"mos-eval  {where}, {n_sets} adapter sets, one batch: sequential {seq * 1e3:.0f} ms | batched "
            f"{bat * 1e3:.0f} ms  ratio {seq / bat:.2f}")
    if args.compile:
        eager, comp, compile_s = compiled_ceiling(bcfg, s["batch"], steps, device)
        out(f"compile  adapter step  {where}: eager {eager:.1f} images/s | torch.compile {comp:.1f} images/s  "
            f"ratio {comp / eager:.2f} (compile {compile_s:.0f} s, not in the ratio)")
    if not args.no_kernel:
        ext, ref = ema_kernel(s["ema_numel"], device)
        if ext is None:
            out(f"ema-kernel n={s['ema_numel']}: extension not built, reference {ref:.2f} ms  ratio n/a")
        else:
            out(f"ema-kernel n={s['ema_numel']} on {device.type}, EMA + restore p=0.01: kernel {ext:.2f} ms, "
                f"PyTorch (flat lerp + torch.rand restore) {ref:.2f} ms  ratio {ref / ext:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`scenario=avalanche/<benchmark>`: Avalanche's benchmark generators as clbench streams.

Avalanche builds the benchmark (its generator, its split of classes or instances, its seed semantics); clbench
wraps the experiences (cl/engine/interop.py:from_avalanche) and evaluates them as it does its own streams. Data are read
from `<data_root>/<folder>` in the layout Avalanche's dataset classes use; nothing is downloaded at run time
unless `scenario.allow_download=true` (the generators download by default, which a cluster node without internet
turns into a hang or an opaque error), so a missing file is a one-line error listing the expected tree.

Class-incremental generators get clbench's class order (`fixed_class_order`, from `class_order_seed` as for the
native streams) and keep the original labels, so a run here and a native run on the same dataset see the same
classes in the same experiences.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scenarios.config import as_dict, get_bool, get_int, get_str
from cl.engine.errors import ConfigError, DatasetError
from cl.engine.interop import from_avalanche, image_tensor, require_avalanche
from cl.engine.stream import Stream
from scenarios.kinds.builders import class_order
from scenarios.datasets.registry import resolve_data_root

_MNIST = ["MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte",
          "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"]


@dataclass(frozen=True)
class Benchmark:
    generator: str            # the function in avalanche.benchmarks.classic
    folder: str               # under data_root
    files: list[str]          # what must exist under data_root/folder (checked before Avalanche runs)
    kind: str                 # class_il: new classes per experience; domain_il: new instances of all classes
    n_classes: int
    class_order_arg: bool = True   # the generator takes fixed_class_order
    fixed: dict = field(default_factory=dict)  # arguments this preset always passes


BENCHMARKS: dict[str, Benchmark] = {
    "split_mnist": Benchmark("SplitMNIST", "mnist", _MNIST, "class_il", 10),
    "permuted_mnist": Benchmark("PermutedMNIST", "mnist", _MNIST, "domain_il", 10, class_order_arg=False),
    "rotated_mnist": Benchmark("RotatedMNIST", "mnist", _MNIST, "domain_il", 10, class_order_arg=False),
    "split_fmnist": Benchmark("SplitFMNIST", "fashionmnist",
                              [f.replace("MNIST/", "FashionMNIST/") for f in _MNIST], "class_il", 10),
    "split_cifar10": Benchmark("SplitCIFAR10", "cifar10",
                               [*(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
                                "cifar-10-batches-py/test_batch", "cifar-10-batches-py/batches.meta"],
                               "class_il", 10),
    "split_cifar100": Benchmark("SplitCIFAR100", "cifar100",
                                ["cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"],
                                "class_il", 100),
    # CORe50 NC: 9 experiences of new objects (10 first, then 5); its one test set is split per experience.
    "core50_nc": Benchmark("CORe50", "core50",
                           ["core50_128x128/", "paths.pkl", "LUP.pkl", "labels.pkl", "labels2names.pkl",
                            "batches_filelists/NC_inc/run0/test_filelist.txt"],
                           "class_il", 50, class_order_arg=False, fixed={"scenario": "nc"}),
}


def expected_tree(name: str, root: Path) -> str:
    spec = BENCHMARKS[name]
    return f"{root / spec.folder}/ with " + ", ".join(spec.files)


def _check_files(name: str, root: Path) -> None:
    spec = BENCHMARKS[name]
    missing = [f for f in spec.files if not (root / spec.folder / f).exists()]
    if missing:
        raise DatasetError(f"avalanche/{name}: {root / spec.folder / missing[0]} is missing; expected "
                           f"{expected_tree(name, root)} (Avalanche's layout; or set scenario.allow_download=true "
                           f"on a machine with internet)")


def build_avalanche(cfg: Any, data_root: str | Path | None = None) -> Stream:
    cfg = as_dict(cfg)
    name = get_str(cfg, "benchmark")
    if name not in BENCHMARKS:
        raise ConfigError(f"unknown Avalanche benchmark '{name}': valid ones are {', '.join(sorted(BENCHMARKS))}")
    spec = BENCHMARKS[name]
    kind = get_str(cfg, "kind", spec.kind)
    if kind not in (spec.kind, "task_il" if spec.kind == "class_il" else spec.kind):
        raise ConfigError(f"avalanche/{name} is a {spec.kind} benchmark, not {kind}: set scenario.kind={spec.kind}")
    root = resolve_data_root(data_root)
    if not get_bool(cfg, "allow_download", False):
        _check_files(name, root)
    require_avalanche()
    from avalanche.benchmarks import classic

    n_exp = get_int(cfg, "n_experiences", minimum=1)
    seed = get_int(cfg, "class_order_seed", 1993)
    args: dict[str, Any] = {"dataset_root": str(root / spec.folder), **spec.fixed}
    if spec.generator != "CORe50":
        args.update(n_experiences=n_exp, seed=seed, train_transform=image_tensor, eval_transform=image_tensor)
        if spec.kind == "class_il":
            args["return_task_id"] = kind == "task_il"
    else:
        args.update(run=get_int(cfg, "run", 0), train_transform=image_tensor, eval_transform=image_tensor)
    order = None
    if spec.class_order_arg:
        order = class_order(spec.n_classes, seed, get_bool(cfg, "shuffle", True))
        args.update(fixed_class_order=order, class_ids_from_zero_in_each_exp=False,
                    class_ids_from_zero_from_first_exp=False)
    try:
        bench = getattr(classic, spec.generator)(**args)
    except (OSError, RuntimeError) as e:  # a damaged file, or a download that could not happen
        raise DatasetError(f"avalanche/{name}: Avalanche could not read {root / spec.folder} ({e}); expected "
                           f"{expected_tree(name, root)}") from e
    stream = from_avalanche(bench, name=get_str(cfg, "name", None) or f"avalanche/{name}", kind=kind,
                            n_classes=spec.n_classes, limit_per_class=get_int(cfg, "limit_per_class", None, minimum=1),
                            extra={"benchmark": name, "generator": spec.generator, "class_order_seed": seed})
    if len(stream) != n_exp and spec.generator != "CORe50":
        raise ConfigError(f"avalanche/{name}: Avalanche made {len(stream)} experiences, not {n_exp}")
    return stream

"""The PTM class-incremental benchmarks of the PILOT family (PILOT, RevisitingCIL/APER, MOS, SEMA) as datasets.

- ImageFolder benchmarks: `<data_root>/<folder>/train|test/<class>/<images>`, the authors' pre-split subsets,
  read and checked by `read_imagefolder_split` with a fixed class count: `imagenet-r` (200), `imagenet-a` (200),
  `cub` (200), `objectnet` (200), `omnibenchmark` (300), `vtab` (50). `scenario.root` overrides the folder
  (absolute, or relative to the data root).
- `cifar100`: torchvision's `<data_root>/cifar-100-python/{train,test,meta}` (PILOT's `cifar224`), read by
  `scenarios.datasets.cifar.read_cifar100` without running pickle code. `scenario.root` overrides the folder that holds
  `cifar-100-python/`.

Both honour `scenario.image_size` (224) and `scenario.augment` (`pilot`: PILOT's crop + flip in training; `none`).
Class orders, task sizes and shuffling are the builders' (`scenarios.kinds.builders`); the configs are
`configs/scenario/<benchmark>[-b0inc<k>].yaml`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cl.engine.errors import DatasetError
from scenarios.datasets.cifar import CIFAR100_FOLDER, read_cifar100
from scenarios.config import get_int, get_str
from scenarios.datasets.imagefolder import expected_tree, read_imagefolder_split
from scenarios.datasets.registry import LoadedData, register_dataset

PILOT_README = "see the LAMDA-PILOT README (sun-hailong/LAMDA-PILOT) for the pre-split archives"


@dataclass(frozen=True)
class ImageFolderBenchmark:
    name: str  # the registered dataset name
    folder: str  # default folder under the data root
    n_classes: int
    pilot_name: str  # the dataset's name in LAMDA-PILOT's utils/data.py
    about: str

    @property
    def source_hint(self) -> str:
        return (
            f"{self.about}: the PILOT family's pre-split train/test subset ('{self.pilot_name}' in LAMDA-PILOT); "
            f"{PILOT_README}; extract it so that <data_root>/{self.folder}/train and /test exist "
            "(or point scenario.root at the extracted folder)"
        )


IMAGEFOLDER_BENCHMARKS: dict[str, ImageFolderBenchmark] = {
    b.name: b
    for b in (
        ImageFolderBenchmark("imagenet-r", "imagenet-r", 200, "imagenetr", "ImageNet-R (renditions of 200 ImageNet classes)"),
        ImageFolderBenchmark("imagenet-a", "imagenet-a", 200, "imageneta", "ImageNet-A (adversarial photos of 200 ImageNet classes)"),
        ImageFolderBenchmark("cub", "cub", 200, "cub", "CUB-200-2011 (200 bird species)"),
        ImageFolderBenchmark("objectnet", "objectnet", 200, "objectnet", "ObjectNet (the 200-class subset)"),
        ImageFolderBenchmark("omnibenchmark", "omnibenchmark", 300, "omnibenchmark", "OmniBenchmark (the 300-class subset)"),
        ImageFolderBenchmark("vtab", "vtab", 50, "vtab", "VTAB (the 50-class subset drawn from several VTAB tasks)"),
    )
}


def _root(cfg: dict, data_root: Path, default: str | Path) -> tuple[Path, str | None]:
    """(resolved root, a hint for when it does not exist and was taken relative to the data root, else None)."""
    given = Path(get_str(cfg, "root", None) or default).expanduser()
    if given.is_absolute():
        return given, None
    hint = (
        f"\n  (looked for under the data root {data_root.absolute()}: set data_root or the CL_DATA environment "
        "variable to the folder that holds it, or scenario.root to an absolute path)"
    )
    return data_root / given, hint


def _imagefolder_loader(bench: ImageFolderBenchmark):
    def load(cfg: dict, data_root: Path) -> LoadedData:
        name = cfg.get("name") or bench.name
        root, relative_hint = _root(cfg, data_root, bench.folder)
        try:
            train, test = read_imagefolder_split(
                root,
                expected_classes=bench.n_classes,
                image_size=get_int(cfg, "image_size", 224, minimum=1),
                augment=get_str(cfg, "augment", "pilot"),
                name=name,
                source_hint=bench.source_hint,
            )
        except DatasetError as e:
            message = str(e)
            if "class folders, expected" in message:
                message += (
                    f"\n  ({bench.name} always has {bench.n_classes} classes; for another subset use "
                    "scenario=imagefolder with scenario.root and scenario.n_classes)"
                )
            if "expected layout" not in message:  # e.g. empty class folders: show the tree and the source too
                message += "\n" + expected_tree(Path(root).absolute(), bench.n_classes, bench.source_hint)
            if relative_hint and not root.is_dir():
                message += relative_hint
            raise DatasetError(message) from None
        return LoadedData(train, test)

    load.__name__ = load.__qualname__ = f"load_{bench.name.replace('-', '_')}"
    load.__doc__ = f"{bench.about}: <data_root>/{bench.folder}/train|test/<class>/..., {bench.n_classes} classes."
    return load


for _bench in IMAGEFOLDER_BENCHMARKS.values():
    register_dataset(_bench.name)(_imagefolder_loader(_bench))


@register_dataset("cifar100")
def load_cifar100(cfg: dict, data_root: Path) -> LoadedData:
    """CIFAR-100 (PILOT's `cifar224`): torchvision's <root>/cifar-100-python/{train,test,meta}, root = data root."""
    name = cfg.get("name") or "cifar100"
    root, relative_hint = _root(cfg, data_root, ".")
    try:
        train, test = read_cifar100(
            root,
            image_size=get_int(cfg, "image_size", 224, minimum=1),
            augment=get_str(cfg, "augment", "pilot"),
            name=name,
        )
    except DatasetError as e:
        missing = not (root / CIFAR100_FOLDER).is_dir() and not (root / "meta").is_file()
        raise DatasetError(str(e) + (relative_hint if relative_hint and missing else "")) from None
    return LoadedData(train, test)


BENCHMARK_DATASETS = ("cifar100", *IMAGEFOLDER_BENCHMARKS)

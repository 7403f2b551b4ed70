"""The ten X-TAIL datasets, read from local folders in the CoOp layout that MoRAM's X-TAIL code (and RAIL's before it)
reads (`Artificer-AI-Lab/MoRAM`, `XTAIL/scenario_datasets/*.py`); nothing is downloaded.

Why a reader of its own: X-TAIL classifies over class NAMES, so each dataset comes with its names and its prompt
template exactly as the reference builds them (the names are part of the benchmark: EuroSAT's get " satellite
location", MNIST's are torchvision's "0 - zero".. wrapped as 'number: "0 - zero"'), and trains on a 16-shot subset
of the train split while testing on the whole test split. Layout under `<data_root>/<scenario.root>`:

    fgvc-aircraft-2013b/data/   images/<id>.jpg, variants.txt, images_variant_train.txt, images_variant_test.txt
    caltech101/                 101_ObjectCategories/..., split_zhou_Caltech101.json
    dtd/                        images/..., split_zhou_DescribableTextures.json
    eurosat/                    2750/..., split_zhou_EuroSAT.json
    flowers-102/                jpg/..., split_zhou_OxfordFlowers.json
    food-101/                   images/..., split_zhou_Food101.json
    MNIST/raw/                  train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-... (torchvision's files)
    oxford-iiit-pet/            images/..., split_zhou_OxfordPets.json
    stanford_cars/              <paths as listed>, split_zhou_StanfordCars.json
    SUN397/                     <paths as listed>, split_zhou_SUN397.json

The folder names are MoRAM's; some may differ from those of CoOp's DATASETS.md (e.g. its caltech-101,
oxford_flowers, oxford_pets, fgvc_aircraft, sun397): rename or link them. A `split_zhou_*.json` (CoOp's split files)
holds {"train": [[path, label, classname], ...], "val": ..., "test": ...} with paths relative to the image folder.
Departures: the 16 shots are drawn with numpy's seeded generator (the reference uses Python's `random` under seed
42), and the images go through clbench's eval transform (bicubic resize to size*256/224, centre crop) rather than
CLIP's own preprocess (resize to size, centre crop).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cl.engine.errors import DatasetError

XTAIL_ORDER = ("aircraft", "caltech101", "dtd", "eurosat", "oxford_flowers", "food101", "mnist", "oxford_pets",
               "stanford_cars", "sun397")  # MoRAM main.py --datasets default (= RAIL's configs/analytic_clip.yaml)
COOP_HINT = "CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp) for the images and the split_zhou_*.json files"


@dataclass(frozen=True)
class XTailDataset:
    name: str
    folder: str            # under the X-TAIL root
    images: str            # image folder under `folder` ("" = `folder` itself)
    split: str | None      # CoOp split JSON under `folder`; None for aircraft (txt lists) and MNIST (idx files)
    template: str          # the reference's template[0]
    name_suffix: str = ""  # appended to every class name (EuroSAT)

    def layout(self, root: Path) -> str:
        base = root / self.folder
        if self.name == "aircraft":
            files = ["images/<id>.jpg", "variants.txt", "images_variant_train.txt", "images_variant_test.txt"]
        elif self.name == "mnist":
            files = [f"{p}-{k}-ubyte[.gz]" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
        else:
            files = [f"{self.images or '.'}/<paths listed in the split>", self.split]
        return f"expected {base}/ with " + ", ".join(files) + f" (see {COOP_HINT}; MNIST: torchvision's raw files)"


DATASETS = {d.name: d for d in (
    XTailDataset("aircraft", "fgvc-aircraft-2013b/data", "images", None, "a photo of a {}, a type of aircraft."),
    XTailDataset("caltech101", "caltech101", "101_ObjectCategories", "split_zhou_Caltech101.json",
                 "a photo of a {}."),
    XTailDataset("dtd", "dtd", "images", "split_zhou_DescribableTextures.json", "{} texture."),
    XTailDataset("eurosat", "eurosat", "2750", "split_zhou_EuroSAT.json", "a centered satellite photo of the {}.",
                 name_suffix=" satellite location"),
    XTailDataset("oxford_flowers", "flowers-102", "jpg", "split_zhou_OxfordFlowers.json",
                 "a photo of a {}, a type of flower."),
    XTailDataset("food101", "food-101", "images", "split_zhou_Food101.json", "a photo of a {}, a type of food."),
    XTailDataset("mnist", "MNIST/raw", "", None, 'a photo of the number: "{}".'),
    XTailDataset("oxford_pets", "oxford-iiit-pet", "images", "split_zhou_OxfordPets.json",
                 "a photo of a {}, a type of pet."),
    XTailDataset("stanford_cars", "stanford_cars", "", "split_zhou_StanfordCars.json", "a photo of a {}."),
    XTailDataset("sun397", "SUN397", "", "split_zhou_SUN397.json", "a photo of a {}."),
)}
MNIST_CLASSES = ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
                 "8 - eight", "9 - nine"]  # torchvision's MNIST.classes


@dataclass
class Split:
    paths: list[str] | None   # image files (None for MNIST, whose images are in `images`)
    labels: np.ndarray
    images: np.ndarray | None = None


def get_spec(name: str) -> XTailDataset:
    if name not in DATASETS:
        raise DatasetError(f"unknown X-TAIL dataset '{name}': expected one of {', '.join(XTAIL_ORDER)}")
    return DATASETS[name]


def _json_split(spec: XTailDataset, base: Path) -> tuple[Split, Split, list[str]]:
    split = json.loads((base / spec.split).read_text())
    image_dir = base / spec.images if spec.images else base
    out, names = [], {}
    for part in ("train", "test"):
        items = split.get(part)
        if not items:
            raise DatasetError(f"{base / spec.split} has no '{part}' items: expected CoOp's split file "
                               f"(train/val/test lists of [path, label, classname])")
        for _, label, cname in items:
            names.setdefault(int(label), str(cname))
        out.append(Split([str(image_dir / p) for p, _, _ in items], np.array([int(x[1]) for x in items])))
    return out[0], out[1], [names[k] for k in sorted(names)]


def _aircraft_split(spec: XTailDataset, base: Path) -> tuple[Split, Split, list[str]]:
    names = [line.strip() for line in (base / "variants.txt").read_text().splitlines() if line.strip()]
    index = {n: i for i, n in enumerate(names)}
    out = []
    for part in ("train", "test"):
        paths, labels = [], []
        for line in (base / f"images_variant_{part}.txt").read_text().splitlines():
            if not line.strip():
                continue
            image_id, variant = line.strip().split(" ", 1)
            if variant not in index:
                raise DatasetError(f"{base}/images_variant_{part}.txt names variant '{variant}' that variants.txt "
                                   f"does not list: use the files of one FGVC-Aircraft 2013b release")
            paths.append(str(base / spec.images / f"{image_id}.jpg"))
            labels.append(index[variant])
        out.append(Split(paths, np.array(labels, dtype=np.int64)))
    return out[0], out[1], names


def _idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic (2 zero bytes, dtype 0x08, ndim), big-endian dims, uint8 data."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_split(spec: XTailDataset, base: Path) -> tuple[Split, Split, list[str]]:
    out = []
    for part in ("train", "t10k"):
        found = {}
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{part}-{kind}-ubyte"
            path = base / name if (base / name).is_file() else base / f"{name}.gz"
            if not path.is_file():
                root = base.parent.parent
                raise DatasetError(f"X-TAIL dataset 'mnist': {base / name} not found; {spec.layout(root)}")
            found[kind] = _idx(path)
        images = found["images-idx3"][:, None]  # [N, 1, 28, 28]; the model input repeats the channel
        out.append(Split(None, found["labels-idx1"].astype(np.int64), images))
    return out[0], out[1], [f'number: "{c}"' for c in MNIST_CLASSES]


def read_xtail(name: str, root: Path) -> tuple[Split, Split, list[str], str]:
    """(train, test, class names, template) of one X-TAIL dataset under `root`; one-line errors otherwise."""
    spec = get_spec(name)
    base = root / spec.folder
    needed = [spec.split] if spec.split else (["variants.txt"] if name == "aircraft" else [])
    if not base.is_dir() or any(not (base / f).is_file() for f in needed):
        raise DatasetError(f"X-TAIL dataset '{name}' not found: {spec.layout(root)}; or set scenario.root to the "
                           f"folder that holds the datasets")
    reader = {"aircraft": _aircraft_split, "mnist": _mnist_split}.get(name, _json_split)
    train, test, names = reader(spec, base)
    if train.paths is not None:
        missing = [p for p in train.paths + test.paths if not Path(p).is_file()]
        if missing:
            raise DatasetError(f"X-TAIL dataset '{name}': {len(missing)} listed image(s) missing, e.g. {missing[0]}; "
                               f"{spec.layout(root)}")
    return train, test, [n + spec.name_suffix for n in names], spec.template


def few_shot(labels: np.ndarray, shots: int | None, seed: int) -> np.ndarray:
    """Indices of `shots` samples per class (fewer in the data: drawn with replacement, as the reference does)."""
    if not shots or shots < 1:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(rng.choice(idx, int(shots), replace=len(idx) < int(shots)))
    return np.sort(np.concatenate(keep))

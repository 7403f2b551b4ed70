"""DomainNet as CoSO (and InfLoRA, CODA-Prompt before it) uses it: class-incremental over 345 classes, the six
domains mixed inside each class, 5 tasks of 69 classes in label order (`configs/scenario/domainnet.yaml`).

The split is not a folder tree but two lists, the InfLoRA split that CoSO ships as `utils/domainnet_trainb.yaml`
and `utils/domainnet_testb.yaml` (InfLoRA: `dataloaders/splits/domainnet_{train,test}.yaml`): YAML mappings with
`data` (image paths) and `targets` (labels 0..344, the order of DomainNet's class list). The reader expects

    <data_root>/domainnet/                 (scenario.root)
        domainnet_trainb.yaml              (scenario.train_list)
        domainnet_testb.yaml               (scenario.test_list)
        clipart/<class>/<image>.jpg   infograph/...   painting/...   quickdraw/...   real/...   sketch/...

A listed path is used as it is when absolute, else relative to the root; a path that starts with folders above a
domain (the lists were written as `data/DomainNet/clipart/...` or similar) is cut to start at the domain folder.
Images are decoded on access with PILOT's transforms (`scenario.augment`), as the PILOT-family benchmarks are.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from cl.engine.errors import DatasetError
from scenarios.config import get_int, get_str
from scenarios.datasets.imagefolder import ImageFolderDataset
from scenarios.datasets.registry import LoadedData, register_dataset

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
N_CLASSES = 345
SOURCE_HINT = (
    "DomainNet images: https://ai.bu.edu/M3SDA/ (the six domain archives); split lists: CoSO's "
    "utils/domainnet_trainb.yaml and utils/domainnet_testb.yaml (quinn-ch/CoSO, the InfLoRA split)"
)


def expected_layout(root: Path, train_list: str, test_list: str) -> str:
    return (
        "expected layout:\n"
        f"  {root}/\n"
        f"    {train_list}    (YAML: data: [<domain>/<class>/<image>, ...], targets: [0..{N_CLASSES - 1}, ...])\n"
        f"    {test_list}\n"
        + "".join(f"    {d}/<class>/<image>.jpg\n" for d in DOMAINS)
        + f"  get them from: {SOURCE_HINT}; or set scenario.root to the folder that holds them"
    )


def _resolve(root: Path, listed: str) -> Path:
    path = Path(listed)
    if path.is_absolute():
        return path
    parts = path.parts
    for i, part in enumerate(parts):  # 'data/DomainNet/clipart/x/y.jpg' -> 'clipart/x/y.jpg'
        if part in DOMAINS:
            return root.joinpath(*parts[i:])
    return root / path


def read_split_list(root: Path, list_name: str, n_classes: int, layout: str) -> tuple[list[str], np.ndarray]:
    """(absolute image paths, int64 targets) from one split list, every path checked to exist."""
    file = root / list_name
    if not file.is_file():
        raise DatasetError(f"domainnet: split list {file} not found\n{layout}")
    try:
        content = yaml.load(file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise DatasetError(f"domainnet: {file} is not valid YAML ({type(e).__name__}): replace it\n{layout}") from None
    if not isinstance(content, dict) or not isinstance(content.get("data"), list) \
            or not isinstance(content.get("targets"), list):
        raise DatasetError(f"domainnet: {file} must be a mapping with lists 'data' and 'targets'\n{layout}")
    data, targets = content["data"], content["targets"]
    if len(data) != len(targets) or not data:
        raise DatasetError(f"domainnet: {file} lists {len(data)} images but {len(targets)} targets; "
                           f"both lists must be non-empty and of equal length\n{layout}")
    targets = np.asarray(targets, dtype=np.int64)
    if targets.min() < 0 or targets.max() >= n_classes:
        raise DatasetError(f"domainnet: {file} has targets outside 0..{n_classes - 1} "
                           f"({int(targets.min())}..{int(targets.max())}): set scenario.n_classes to match\n{layout}")
    paths = [str(_resolve(root, p)) for p in data]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DatasetError(f"domainnet: {len(missing)} of {len(paths)} images listed in {file} are missing, "
                           f"first: {missing[0]}; extract the domain archives under {root}\n{layout}")
    return paths, targets


def class_names(paths: list[str], targets: np.ndarray, n_classes: int) -> list[str]:
    """Each label's class folder name (the path's parent folder), `class_<k>` for labels with no image listed."""
    names = [f"class_{k}" for k in range(n_classes)]
    for path, t in zip(paths, targets):
        names[int(t)] = Path(path).parent.name
    return names


def domainnet_dataset(root: Path, paths, targets, names, image_size: int, train: bool,
                      augment: str) -> ImageFolderDataset:
    """An `ImageFolderDataset` over listed files: its index maps each label's name, in label order, to its paths."""
    index = {name: [] for name in dict.fromkeys(names)}
    if len(index) != len(names):  # two labels share a folder name: keep the labels apart
        names = [f"{n}_{k}" for k, n in enumerate(names)]
        index = {name: [] for name in names}
    by_label = list(index)
    for path, t in zip(paths, targets):
        index[by_label[int(t)]].append(path)
    return ImageFolderDataset(root, image_size=image_size, train=train,
                              augment=augment, index=index)


@register_dataset("domainnet")
def load_domainnet(cfg: dict, data_root: Path) -> LoadedData:
    """DomainNet (345 classes) from CoSO's InfLoRA split lists under <data_root>/domainnet."""
    given = Path(get_str(cfg, "root", None) or "domainnet").expanduser()
    root = given if given.is_absolute() else data_root / given
    train_list = get_str(cfg, "train_list", "domainnet_trainb.yaml")
    test_list = get_str(cfg, "test_list", "domainnet_testb.yaml")
    n_classes = get_int(cfg, "n_classes", N_CLASSES, minimum=1)
    layout = expected_layout(root.absolute(), train_list, test_list)
    if not root.is_dir():
        hint = "" if given.is_absolute() else (f" (relative to the data root {data_root.absolute()}: set data_root, "
                                               "CL_DATA or an absolute scenario.root)")
        raise DatasetError(f"domainnet: folder {root.absolute()} not found{hint}\n{layout}")
    train_paths, train_targets = read_split_list(root, train_list, n_classes, layout)
    test_paths, test_targets = read_split_list(root, test_list, n_classes, layout)
    names = class_names(test_paths + train_paths, np.concatenate([test_targets, train_targets]), n_classes)
    size = get_int(cfg, "image_size", 224, minimum=1)
    augment = get_str(cfg, "augment", "pilot")
    train = domainnet_dataset(root, train_paths, train_targets, names, size, True, augment)
    test = domainnet_dataset(root, test_paths, test_targets, names, size, False, augment)
    return LoadedData(train, test)

"""Few-shot class-incremental (FSCIL) streams: a base session, then N-way K-shot sessions (`kind: fscil`).

Session 1 holds *all* training data of the base classes; every later session holds `shots` training images of
each of its `ways` new classes. The test set of a session is every test image of that session's classes, so the
trainer's usual evaluation (the union of the test sets of sessions 1..s) is the FSCIL protocol's accuracy over
all classes seen so far, and `metrics.stage_acc` is the per-session accuracy curve.

Two ways to fix the sessions:

(a) **Index files** (`scenario.fscil.index_dir`), the standard lists of the CEC / FACT protocol
    (icoz69/CEC-CVPR2021 and zhoudw-zdw/CVPR22-Fact `data/index_list/<dataset>/`; aresPanos/fsa ships the same
    lists under `datasets/fscil/`). Layout::

        <index_dir>/
          session_1.txt      the base session: every training sample of the base classes, one per line
          session_2.txt      session 2: ways x shots lines
          ...
          session_<S+1>.txt  the last session (CIFAR-100 and miniImageNet: session_9; CUB-200: session_11)

    A line is one training sample, in one of two forms (blank lines and lines starting with `#` are skipped):

    - an **integer**: the sample's index in the training split, in the dataset's own order. CEC's CIFAR-100 lists
      are of this form (`29774`): indices into torchvision's `cifar-100-python/train`, which is the order
      `scenarios.datasets.cifar.read_cifar100` keeps.
    - an **image path**: matched by its last two components, `<class folder>/<file name>`, against an ImageFolder
      training split `<root>/train/<class folder>/<file name>`. CEC's CUB-200 lines
      (`CUB_200_2011/images/101.White_Pelican/White_Pelican_0081_96148.jpg`) and miniImageNet lines
      (`MINI-ImageNet/train/n03544143/n0354414300000811.jpg`) are used unchanged; the prefix before the last two
      components is ignored, so the lists need no editing whatever the local folder is called.

    The classes of a session are those of its samples; sessions must not share classes. The `base_classes`,
    `ways`, `shots` and `sessions` fields, when set, are checked against the files. `index_dir` is absolute or
    relative to the data root; missing files raise a `DatasetError` showing this layout.

(b) **A seeded generator** for any labelled dataset (`index_dir: null`): `fscil(train, test, base_classes, ways,
    shots, sessions, seed)`. Classes come in class order (`shuffle`/`class_order_seed` as in the other
    scenarios; natural order by default, as the FSCIL protocol); the base session takes every training sample of
    the first `base_classes` classes and each later session `shots` samples of each of its `ways` classes, drawn
    without replacement by `numpy.random.default_rng(seed)`. `write_index_files` saves any stream's sessions in
    format (a), so a generated protocol can be frozen and shared.

`resize` (default `pilot`: the dataset reader's own transforms) replaces the input pipeline of image datasets
(CIFAR-100, ImageFolder trees) with the one of FSA's FSCIL loaders (aresPanos/fsa), for train and test alike and
with no augmentation (so it needs `augment: none`):

- `lanczos`: straight to image_size x image_size with LANCZOS, no crop (`src/dataloader/cifar100_fscil.py:161-165`
  training with iscl_all=True, the FSCIL path, and `:176-180` test);
- `bilinear_crop`: bilinear resize of the short side to image_size*256/224, centre crop (torchvision's
  Resize(256) + CenterCrop(224), `src/dataloader/cub200.py:97-101` training with iscl_all=True and `:127-131` test).
  PILOT's eval transform is the same crop with bicubic resizing.

`limit_per_class` (debug runs) keeps the first N samples per class of the base session and of the test sets; the
few-shot picks are never cut. The chosen few-shot samples are recorded in `StreamInfo.extra["few_shot_indices"]`
(indices into the training split), so a result names its exact shots.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch.utils.data import Dataset
from torchvision.transforms import v2

import scenarios as _scenarios
from cl.engine import kind_metrics as km
from cl.engine.errors import ConfigError, DatasetError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Experience, Stream, StreamInfo
from scenarios.kinds.builders import (
    _class_names,
    _first_per_class,
    _n_classes,
    _require_samples,
    _sizes,
    _targets,
    class_order,
)
from scenarios.config import as_dict, get_bool, get_int, get_str
from cl.engine.in_memory import input_shape_of
from scenarios.datasets.registry import get_loader, resolve_data_root
from cl.engine.subset import TargetSubset

RESIZES = ("pilot", "lanczos", "bilinear_crop")
SESSION_FILE = "session_{}.txt"
PROTOCOL_SOURCE = (
    "the CEC/FACT index lists: data/index_list/<dataset>/session_<k>.txt in icoz69/CEC-CVPR2021 "
    "(identical in zhoudw-zdw/CVPR22-Fact; aresPanos/fsa datasets/fscil/<dataset>/)"
)


# ----------------------------------------------------------------------------------------------------------
# Building a stream from per-session training indices
# ----------------------------------------------------------------------------------------------------------
def from_sessions(train: Dataset, test: Dataset, sessions: Sequence[Sequence[int]], *, name: str = "fscil",
                  limit_per_class: int | None = None, extra: dict | None = None) -> Stream:
    """The FSCIL stream whose session k trains on `train[sessions[k]]` (indices into the training split) and tests
    on every test sample of that session's classes. Sessions must not share classes."""
    train_targets, test_targets = _targets(train, "train"), _targets(test, "test")
    n_classes = _n_classes(name, train, train_targets, test_targets)
    if len(sessions) == 0:
        raise ConfigError(f"{name}: an FSCIL stream needs at least the base session")
    test_keep = _first_per_class(test_targets, limit_per_class)
    experiences, order, seen = [], [], set()
    for k, idx in enumerate(sessions):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        if len(idx) == 0:
            raise DatasetError(f"{name}: session {k + 1} lists no training samples")
        if idx.min() < 0 or idx.max() >= len(train_targets):
            raise DatasetError(f"{name}: session {k + 1} names training sample {int(idx.max())}, but the training "
                               f"split has {len(train_targets)} samples (0..{len(train_targets) - 1})")
        if len(np.unique(idx)) != len(idx):
            raise DatasetError(f"{name}: session {k + 1} lists a training sample more than once")
        classes = sorted(int(c) for c in np.unique(train_targets[idx]))
        again = sorted(seen.intersection(classes))
        if again:
            raise DatasetError(f"{name}: session {k + 1} has classes of an earlier session ({again[:5]}); "
                               "FSCIL sessions bring new classes only")
        seen.update(classes)
        order += classes
        if k == 0 and limit_per_class is not None:  # debug cut of the base session, in the listed order
            idx = idx[_first_per_class(train_targets[idx], limit_per_class)]
        test_idx = np.flatnonzero(np.isin(test_targets, classes) & test_keep)
        _require_samples(name, f"session {k + 1} (classes {classes[:8]}{'...' if len(classes) > 8 else ''})",
                         idx, test_idx)
        shots = np.bincount(train_targets[idx], minlength=n_classes)[classes]
        experiences.append(Experience(
            index=k, train=TargetSubset(train, idx), test=TargetSubset(test, test_idx), classes=classes,
            kind=KIND.name, task_id=k,
            meta={"session": k + 1, "ways": len(classes), "shots": int(shots.min()) if k else None},
        ))
    few_shot = [np.asarray(s, dtype=np.int64).reshape(-1).tolist() for s in sessions[1:]]
    info = StreamInfo(
        name=name, kind=KIND.name, n_classes=n_classes, n_experiences=len(experiences), class_order=order,
        class_names=_class_names(train), input_shape=input_shape_of(train),
        classes_per_experience=[list(e.classes) for e in experiences],
        extra={"protocol": "fscil", "base_classes": len(experiences[0].classes),
               "ways": [len(e.classes) for e in experiences[1:]], "limit_per_class": limit_per_class,
               **(extra or {}), "few_shot_indices": few_shot, **_sizes(experiences)},
    )
    return Stream(experiences, info, KIND.protocol)


def generate_sessions(train_targets: np.ndarray, order: Sequence[int], *, base_classes: int, ways: int, shots: int,
                      sessions: int, seed: int, name: str = "fscil") -> list[np.ndarray]:
    """Training indices per session: all samples of `order[:base_classes]`, then `shots` samples of each next
    `ways` classes, drawn without replacement by `np.random.default_rng(seed)` (class by class, in order)."""
    for key, value, low in (("base_classes", base_classes, 1), ("ways", ways, 1), ("shots", shots, 1),
                            ("sessions", sessions, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(f"{name}: fscil.{key} must be an integer >= {low}, got {value!r}")
    order = [int(c) for c in order]
    needed = base_classes + ways * sessions
    if needed > len(order):
        raise ConfigError(f"{name}: {base_classes} base classes + {sessions} sessions x {ways} ways = {needed} "
                          f"classes, but the dataset has {len(order)}")
    targets = np.asarray(train_targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    out = [np.flatnonzero(np.isin(targets, order[:base_classes]))]
    for s in range(sessions):
        picks = []
        for c in order[base_classes + s * ways: base_classes + (s + 1) * ways]:
            pool = np.flatnonzero(targets == c)
            if len(pool) < shots:
                raise DatasetError(f"{name}: class {c} has {len(pool)} training samples, fewer than {shots} shots")
            picks.append(np.sort(rng.choice(pool, size=shots, replace=False)))
        out.append(np.concatenate(picks))
    return out


def fscil(train: Dataset, test: Dataset, base_classes: int, ways: int, shots: int, sessions: int, seed: int, *,
          name: str = "fscil", order: Sequence[int] | None = None, limit_per_class: int | None = None) -> Stream:
    """A seeded N-way K-shot stream over any labelled (train, test) pair (natural class order unless `order`)."""
    targets = _targets(train, "train")
    n = _n_classes(name, train, targets, _targets(test, "test"))
    order = list(range(n)) if order is None else [int(c) for c in order]
    idx = generate_sessions(targets, order, base_classes=base_classes, ways=ways, shots=shots, sessions=sessions,
                            seed=seed, name=name)
    extra = {"source": "generated", "seed": int(seed), "shots": int(shots), "sessions": int(sessions)}
    return from_sessions(train, test, idx, name=name, limit_per_class=limit_per_class, extra=extra)


# ----------------------------------------------------------------------------------------------------------
# Input pipelines (`scenario.resize`)
# ----------------------------------------------------------------------------------------------------------
def resize_transform(mode: str, image_size: int) -> v2.Compose:
    """The uint8 transform of a non-`pilot` `resize` mode (module docstring)."""
    if mode == "lanczos":
        steps = [v2.Resize((image_size, image_size), interpolation=v2.InterpolationMode.LANCZOS)]
    elif mode == "bilinear_crop":
        steps = [v2.Resize(int(image_size * 256 / 224), interpolation=v2.InterpolationMode.BILINEAR),
                 v2.CenterCrop(image_size)]
    else:
        raise ConfigError(f"scenario.resize must be one of {', '.join(RESIZES)}, got {mode!r}")
    return v2.Compose([*steps, v2.PILToTensor()])


def apply_resize(datasets: Sequence[Dataset], mode: str, *, name: str = "fscil") -> None:
    """Gives every dataset (CIFAR-100 / ImageFolder readers: `transform`, `image_size`, `augment`) the `resize`
    mode's transform in place; `pilot` leaves them as read."""
    if mode == "pilot":
        return
    if mode not in RESIZES:
        raise ConfigError(f"{name}: scenario.resize must be one of {', '.join(RESIZES)}, got {mode!r}")
    for ds in datasets:
        if not all(hasattr(ds, a) for a in ("transform", "image_size", "augment")):
            raise ConfigError(f"{name}: scenario.resize={mode} needs an image dataset that decodes and resizes its "
                              f"images (cifar100, imagefolder); {type(ds).__name__} has no transform: use "
                              "scenario.resize=pilot")
        if getattr(ds, "train", False) and ds.augment != "none":
            raise ConfigError(f"{name}: scenario.resize={mode} is FSA's whole input pipeline, without augmentation: "
                              "set scenario.augment=none")
        ds.transform = resize_transform(mode, int(ds.image_size))


# ----------------------------------------------------------------------------------------------------------
# The index-file format
# ----------------------------------------------------------------------------------------------------------
def expected_layout(index_dir: Path, n_files: int | None = None) -> str:
    last = f"session_{n_files}.txt" if n_files else "session_<S+1>.txt"
    return "\n".join([
        "expected layout (the CEC/FACT few-shot class-incremental index lists):",
        f"  {index_dir}/",
        "    session_1.txt   the base session: every training sample of the base classes, one per line",
        "    session_2.txt   the first few-shot session: ways x shots lines",
        f"    ...             up to {last}",
        "  a line is a sample index into the training split in the dataset's order (CEC's CIFAR-100 lists: indices",
        "  into torchvision's cifar-100-python/train), or an image path matched by its last two components",
        "  <class folder>/<file> against <root>/train/<class folder>/<file> (CEC's CUB-200 and miniImageNet lists)",
        f"  where to get them: {PROTOCOL_SOURCE}",
    ])


def session_files(index_dir: str | Path) -> list[Path]:
    """`session_1.txt, session_2.txt, ...` in `index_dir`, up to the first missing number."""
    index_dir = Path(index_dir)
    files, k = [], 1
    while (index_dir / SESSION_FILE.format(k)).is_file():
        files.append(index_dir / SESSION_FILE.format(k))
        k += 1
    return files


def _path_key(text: str) -> str | None:
    parts = [p for p in re.split(r"[\\/]+", text.strip()) if p]
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def _path_index(train: Dataset) -> dict[str, int]:
    """`<class folder>/<file name>` -> sample index, for datasets that keep their files (`samples` of paths)."""
    samples = getattr(train, "samples", None)
    base, positions = train, None
    if samples is None and isinstance(train, TargetSubset):
        base, positions = train.dataset, train.indices
        samples = getattr(base, "samples", None)
    if samples is None:
        return {}
    keys = [_path_key(str(s[0] if isinstance(s, (tuple, list)) else s)) for s in samples]
    if positions is not None:
        keys = [keys[int(i)] for i in positions]
    return {k: i for i, k in enumerate(keys) if k is not None}


def read_session_file(path: str | Path, train: Dataset, *, name: str = "fscil",
                      path_index: dict[str, int] | None = None) -> np.ndarray:
    """One session list -> indices into `train` (integer lines as they are, path lines matched by their last two
    components). Unknown paths or out-of-range indices raise a `DatasetError` naming the first few."""
    path = Path(path)
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    out, unknown = [], []
    for ln in lines:
        if re.fullmatch(r"\d+", ln):
            out.append(int(ln))
            continue
        if path_index is None:
            path_index = _path_index(train)
        key = _path_key(ln)
        if not path_index:
            raise DatasetError(
                f"{name}: {path} lists image paths ({ln!r}), but the training split of this dataset has no file "
                "paths to match them with: use an ImageFolder dataset (<root>/train/<class>/<file>), or integer "
                "sample indices")
        if key not in path_index:
            unknown.append(ln)
            continue
        out.append(path_index[key])
    if unknown:
        raise DatasetError(
            f"{name}: {len(unknown)} of {len(lines)} images listed in {path} are not in the training split "
            f"(first: {unknown[0]!r}, looked up as '{_path_key(unknown[0])}'): the training tree must hold "
            "<root>/train/<class folder>/<file> for every listed image (FSCIL lists use the dataset's official "
            "train split)")
    return np.asarray(out, dtype=np.int64)


def read_index_files(index_dir: str | Path, train: Dataset, *, name: str = "fscil",
                     n_sessions: int | None = None) -> list[np.ndarray]:
    """Training indices of every session listed in `index_dir` (format (a) of the module docstring)."""
    index_dir = Path(index_dir)
    files = check_index_dir(index_dir, n_sessions, name=name)
    index = _path_index(train)
    return [read_session_file(f, train, name=name, path_index=index) for f in files]


def check_index_dir(index_dir: str | Path, n_sessions: int | None = None, *, name: str = "fscil") -> list[Path]:
    """The session files of `index_dir`, after checking there are some (and `n_sessions` + 1 when given)."""
    index_dir = Path(index_dir)
    files = session_files(index_dir)
    expected = None if n_sessions is None else n_sessions + 1
    if not files:
        state = "does not exist" if not index_dir.is_dir() else "holds no session_1.txt"
        raise DatasetError(f"{name}: FSCIL session lists not found: {index_dir} {state}\n"
                           f"{expected_layout(index_dir, expected)}")
    if expected is not None and len(files) != expected:
        more = (f"; session_{expected}.txt is missing" if len(files) < expected
                else f"; there is a {files[-1].name} beyond it")
        raise DatasetError(f"{name}: {index_dir} has {len(files)} session files (session_1..{len(files)}), the "
                           f"config asks for a base session + {n_sessions} sessions = {expected}{more}\n"
                           f"{expected_layout(index_dir, expected)}")
    return files


def write_index_files(index_dir: str | Path, sessions: Sequence[Sequence[int]], train: Dataset | None = None,
                      *, as_paths: bool = False) -> list[Path]:
    """Writes `session_<k>.txt` for every session (format (a)): sample indices, or with `as_paths` the file paths
    of an ImageFolder `train` split. Returns the files written."""
    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    if as_paths:
        samples = getattr(train, "samples", None)
        if samples is None:
            raise ValueError("as_paths needs a training split with file paths (`samples`)")
    out = []
    for k, idx in enumerate(sessions, start=1):
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        lines = [str(samples[int(i)][0]) for i in idx] if as_paths else [str(int(i)) for i in idx]
        path = index_dir / SESSION_FILE.format(k)
        path.write_text("\n".join(lines) + "\n")
        out.append(path)
    return out


# ----------------------------------------------------------------------------------------------------------
# `scenarios.build` for `kind: fscil`
# ----------------------------------------------------------------------------------------------------------
def build_fscil(cfg: Any, data_root: str | Path | None = None) -> Stream:
    """The `kind: fscil` stream a scenario config describes (`scenarios.build` dispatches here).

    Config (`scenario:`): `dataset`, `name`, `fscil: {base_classes, ways, shots, sessions, index_dir, seed}`,
    `shuffle` (default false: natural class order), `class_order_seed`, `limit_per_class`, `resize` (default
    `pilot`), plus the dataset's own fields. Names and numbers are checked before any data is read."""
    cfg = as_dict(cfg)
    dataset = get_str(cfg, "dataset")
    loader = get_loader(dataset)
    name = get_str(cfg, "name", None) or dataset
    sub = cfg.get("fscil")
    if not isinstance(sub, dict):
        raise ConfigError(f"{name}: a kind: fscil scenario needs an 'fscil:' block "
                          "({base_classes, ways, shots, sessions, index_dir, seed})")
    where = f"{name}.fscil"
    fields = {k: get_int(sub, k, None, minimum=0 if k == "sessions" else 1, where=where)
              for k in ("base_classes", "ways", "shots", "sessions")}
    index_dir = get_str(sub, "index_dir", None, where=where)
    seed = get_int(sub, "seed", 0, minimum=0, where=where)
    order_seed = get_int(cfg, "class_order_seed", _scenarios.DEFAULT_CLASS_ORDER_SEED)
    shuffle = get_bool(cfg, "shuffle", False)
    limit = get_int(cfg, "limit_per_class", None, minimum=1)
    resize = get_str(cfg, "resize", "pilot")
    if resize not in RESIZES:
        raise ConfigError(f"{name}: scenario.resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    if index_dir is None:
        missing = [k for k, v in fields.items() if v is None]
        if missing:
            raise ConfigError(f"{name}: a generated FSCIL stream (fscil.index_dir: null) needs fscil."
                              f"{', fscil.'.join(missing)}")
    root = resolve_data_root(data_root)
    if index_dir is not None:  # the lists are checked before the (possibly large) dataset is read
        folder = Path(index_dir).expanduser()
        folder = folder if folder.is_absolute() else root / folder
        check_index_dir(folder, fields["sessions"], name=name)
    data = loader({**cfg, "name": name}, root)
    apply_resize((data.train, data.test), resize, name=name)
    if index_dir is None:
        targets = _targets(data.train, "train")
        n = _n_classes(name, data.train, targets, _targets(data.test, "test"))
        stream = fscil(data.train, data.test, fields["base_classes"], fields["ways"], fields["shots"],
                       fields["sessions"], seed, name=name, order=class_order(n, order_seed, shuffle),
                       limit_per_class=limit)
        stream.info.extra.update({"class_order_seed": order_seed, "shuffle": shuffle, "index_dir": None})
        return stream
    sessions = read_index_files(folder, data.train, name=name, n_sessions=fields["sessions"])
    _check_against_config(name, folder, sessions, _targets(data.train, "train"), fields)
    extra = {"source": "index_files", "index_dir": str(folder.absolute()), "shots": fields["shots"],
             "sessions": len(sessions) - 1}
    return from_sessions(data.train, data.test, sessions, name=name, limit_per_class=limit, extra=extra)


def _check_against_config(name: str, folder: Path, sessions: list[np.ndarray], targets: np.ndarray,
                          fields: dict) -> None:
    """The session files agree with the configured base_classes / ways / shots (those that are set)."""
    problems = []
    base = len(np.unique(targets[sessions[0]]))
    if fields["base_classes"] is not None and base != fields["base_classes"]:
        problems.append(f"session_1.txt has {base} classes, fscil.base_classes is {fields['base_classes']}")
    for k, idx in enumerate(sessions[1:], start=2):
        counts = np.bincount(targets[idx])
        counts = counts[counts > 0]
        if fields["ways"] is not None and len(counts) != fields["ways"]:
            problems.append(f"session_{k}.txt has {len(counts)} classes, fscil.ways is {fields['ways']}")
        if fields["shots"] is not None and (counts != fields["shots"]).any():
            problems.append(f"session_{k}.txt has {sorted(set(counts.tolist()))} samples per class, "
                            f"fscil.shots is {fields['shots']}")
    if problems:
        raise DatasetError(f"{name}: the session lists in {folder} do not match the config: "
                           + "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""))


# A base session, then N-way K-shot sessions: trained and scored as class-incremental.
KIND = Kind(
    name="fscil", build=build_fscil, protocol=EvalProtocol(),
    metrics=km.incremental, summary=km.incremental_summary, score=km.seen_score,
)

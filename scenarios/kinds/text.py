"""The `text` scenario kind: a sequence of text-classification datasets, one experience per dataset.

Two sources:
- `dataset: synthetic-text`: the test-sized stream of `scenarios/datasets/synthetic_text.py` (3 tasks x 2 classes, real
  English words so that a real sentence encoder separates the tasks). No files.
- `dataset: idbr`: the standard 5-dataset sequence (AG News, Yelp, Amazon, DBpedia, Yahoo) in the CSV layout IDBR
  prepared and SLM reads (`SLM-bert/dataset/utils.py`): `<root>/<name>/{train,test}.csv`, no header, columns
  `label` (1-based), `title`, `content`; the text is `content`. `<name>.jsonl` files (`{"label": int 1-based,
  "text": str}` per line) are read instead when a folder holds `train.jsonl`/`test.jsonl`.

Labels are global class ids and never remapped: each dataset owns a fixed block of ids, and datasets that share a
label space share the block (Amazon reuses Yelp's 5 rating classes, as IDBR's preprocessing does and SLM's
heads keyed by the number of labels do), so the 5 datasets make 4 + 5 + 14 + 10 = 33 classes. The arrival order
is `StreamInfo.class_order`.

Per-class sampling follows SLM's `get_dataset_by_name(k_samples)`: `k` training samples per class and
`int(0.15 k)` test samples per class, drawn with `np.random.RandomState(sample_seed)`; `k_samples: -1` (the
reference's setting for the BERT benchmark) keeps everything. `limit_per_class` (what `debug=fast` sets) then keeps
the first N of each class in both splits, as the image builders do.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from torch.utils.data import Dataset

from cl.engine import kind_metrics as km
from cl.engine.errors import ConfigError, DatasetError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Experience, Stream, StreamInfo
from scenarios.datasets.registry import resolve_data_root

# Name -> (label space, number of classes). Datasets with the same label space share global ids.
IDBR_TASKS = {"ag": ("ag", 4), "yelp": ("rating", 5), "amazon": ("rating", 5), "dbpedia": ("dbpedia", 14),
              "yahoo": ("yahoo", 10)}
ALIASES = {"ag_news": "ag"}
# SLM-bert/train.py TASK_LIST: the 5-task orders 4-7 and the 3-task orders 1-3 (over ag/yelp/yahoo).
ORDERS = {
    "1": ["ag", "yelp", "yahoo"], "2": ["yelp", "yahoo", "ag"], "3": ["yahoo", "ag", "yelp"],
    "4": ["ag", "yelp", "amazon", "yahoo", "dbpedia"], "5": ["yelp", "yahoo", "amazon", "dbpedia", "ag"],
    "6": ["dbpedia", "yahoo", "ag", "amazon", "yelp"], "7": ["yelp", "ag", "dbpedia", "amazon", "yahoo"],
}
EXPECTED_TREE = """expected layout (IDBR's CSVs, https://github.com/SALT-NLP/IDBR, as Pbihao/SLM reads them):
  {root}/
    ag/       train.csv  test.csv     # rows: label (1-based), title, content; no header
    yelp/     train.csv  test.csv
    amazon/   train.csv  test.csv
    dbpedia/  train.csv  test.csv
    yahoo/    train.csv  test.csv
  (train.jsonl/test.jsonl with {{"label": 1-based int, "text": str}} per line are read instead of the CSVs)"""


class TextDataset(Dataset):
    """`ds[i] = (text, global label)`; `targets` is an int64 array so builders select without reading texts."""

    def __init__(self, texts: Sequence[str], targets: Sequence[int]):
        if len(texts) != len(targets):
            raise ValueError(f"{len(texts)} texts but {len(targets)} labels")
        self.texts = list(texts)
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.texts[i], int(self.targets[i])

    def select(self, idx: np.ndarray) -> "TextDataset":
        return TextDataset([self.texts[i] for i in idx], self.targets[idx])


def first_per_class(ds: TextDataset, n: int | None) -> TextDataset:
    """The first `n` samples of each class in dataset order (the image builders' `limit_per_class`)."""
    if n is None:
        return ds
    keep = np.concatenate([np.flatnonzero(ds.targets == c)[:n] for c in np.unique(ds.targets)])
    return ds.select(np.sort(keep))


def sample_per_class(ds: TextDataset, k: int, rng: np.random.RandomState) -> TextDataset:
    """`k` random samples per class without replacement (all of a class that has fewer), as SLM samples."""
    if k < 0:
        return ds
    keep = [rng.choice(np.flatnonzero(ds.targets == c), min(k, int((ds.targets == c).sum())), replace=False)
            for c in np.unique(ds.targets)]
    return ds.select(np.sort(np.concatenate(keep)))


# --- the IDBR files ------------------------------------------------------------------------------------------
def _split_file(folder: Path, split: str) -> Path | None:
    for name in (f"{split}.csv", f"{split}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_split(path: Path, n_classes: int) -> tuple[list[str], list[int]]:
    """Texts and 0-based labels of one IDBR split file; a malformed row is a `DatasetError` naming its line."""
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        rows = (json.loads(line) for line in f if line.strip()) if path.suffix == ".jsonl" else csv.reader(f)
        for line, row in enumerate(rows, start=1):
            try:
                label, text = (row["label"], row["text"]) if isinstance(row, dict) else (row[0], row[-1])
                label = int(label) - 1
            except (KeyError, IndexError, ValueError, TypeError):
                raise DatasetError(f"{path}:{line}: expected a 1-based integer label and a text, got {row!r}") from None
            if not 0 <= label < n_classes:
                raise DatasetError(f"{path}:{line}: label {label + 1} is outside 1..{n_classes} for this dataset")
            texts.append(text)
            labels.append(label)
    if not texts:
        raise DatasetError(f"{path} is empty")
    return texts, labels


def check_idbr_root(root: Path, tasks: Sequence[str]) -> None:
    """Every file is there before anything is read; the error lists what is missing and the expected tree."""
    missing = [f"{root / t}/{s}.csv" for t in tasks for s in ("train", "test") if _split_file(root / t, s) is None]
    if missing:
        raise DatasetError(f"idbr text data incomplete: missing {', '.join(missing[:4])}"
                           f"{f' (+{len(missing) - 4} more)' if len(missing) > 4 else ''}; set data_root (or "
                           f"scenario.root) to the folder holding them\n" + EXPECTED_TREE.format(root=root))


# --- the builder --------------------------------------------------------------------------------------------
def task_list(cfg: dict) -> list[str]:
    """The dataset order: `tasks: [...]`, or `order:` one of SLM's TASK_LIST keys."""
    tasks, order = cfg.get("tasks"), cfg.get("order")
    if tasks is None:
        if str(order) not in ORDERS:
            raise ConfigError(f"scenario.order {order!r} unknown: expected one of {', '.join(ORDERS)} "
                              "(SLM's TASK_LIST) or a list in scenario.tasks")
        return list(ORDERS[str(order)])
    tasks = [ALIASES.get(str(t), str(t)) for t in tasks]
    bad = [t for t in tasks if t not in IDBR_TASKS]
    if bad or len(set(tasks)) != len(tasks) or not tasks:
        raise ConfigError(f"scenario.tasks {tasks!r}: each of {', '.join(IDBR_TASKS)} at most once")
    return tasks


def label_blocks(tasks: Sequence[str], spaces: dict[str, tuple[str, int]]) -> tuple[dict[str, int], int]:
    """Global offset of each label space the tasks use, in canonical (not task) order, and the class count:
    a dataset's ids are the same whatever the order."""
    used = {spaces[t][0] for t in tasks}
    offsets, nxt = {}, 0
    for space, n in spaces.values():
        if space in used and space not in offsets:
            offsets[space], nxt = nxt, nxt + n
    return offsets, nxt


def build_text(cfg: dict, data_root: str | Path | None = None) -> Stream:
    dataset = cfg.get("dataset")
    limit = cfg.get("limit_per_class")
    if dataset == "synthetic-text":
        from scenarios.datasets.synthetic_text import N_CLASSES_PER_TASK, TOPICS, make_texts

        tasks = [str(t) for t in (cfg.get("tasks") or [name for name, _, _ in TOPICS])]
        known = [name for name, _, _ in TOPICS]
        if any(t not in known for t in tasks) or len(set(tasks)) != len(tasks):
            raise ConfigError(f"scenario.tasks {tasks!r}: each of {', '.join(known)} at most once")
        spaces = {name: (name, N_CLASSES_PER_TASK) for name in known}
        syn = dict(cfg.get("synthetic") or {})
        n_train, n_test, seed = int(syn.get("train_per_class", 40)), int(syn.get("test_per_class", 20)), int(syn.get("seed", 0))

        def load(name: str, split: str) -> tuple[list[str], list[int]]:
            k = known.index(name)
            return make_texts(k, n_train if split == "train" else n_test, seed=2 * seed + (split == "test"))
    elif dataset == "idbr":
        tasks = task_list(cfg)
        spaces = IDBR_TASKS
        root = Path(cfg.get("root") or "idbr")
        root = root if root.is_absolute() else resolve_data_root(data_root) / root
        check_idbr_root(root, tasks)

        def load(name: str, split: str) -> tuple[list[str], list[int]]:
            return read_split(_split_file(root / name, split), spaces[name][1])
    else:
        raise ConfigError(f"text scenario dataset {dataset!r} unknown: expected synthetic-text or idbr")

    k = int(cfg.get("k_samples", -1))
    rng = np.random.RandomState(int(cfg.get("sample_seed", 0)))
    offsets, n_classes = label_blocks(tasks, spaces)
    sizes = dict(spaces.values())
    names = [f"{space}:{c}" for space in offsets for c in range(sizes[space])]  # offsets ascend: id order
    exps, per_exp, order = [], [], []
    for i, name in enumerate(tasks):
        space, n = spaces[name]
        base = offsets[space]
        split_data = {}
        for split in ("train", "test"):
            texts, labels = load(name, split)
            ds = TextDataset(texts, [base + y for y in labels])
            kk = k if split == "train" or k < 0 else int(k * 0.15)
            split_data[split] = first_per_class(sample_per_class(ds, kk, rng), limit)
        classes = list(range(base, base + n))
        exps.append(Experience(i, split_data["train"], split_data["test"], classes, "text", task_id=i, domain=name))
        per_exp.append(classes)
        order += [c for c in classes if c not in order]
    info = StreamInfo(name=cfg.get("name") or dataset, kind="text", n_classes=n_classes, n_experiences=len(exps),
                      class_order=order, class_names=names, input_shape=(), classes_per_experience=per_exp,
                      extra={"tasks": tasks, "label_spaces": [spaces[t][0] for t in tasks]})
    return Stream(exps, info, KIND.protocol)


KIND = Kind(
    name="text", build=build_text, protocol=EvalProtocol(),
    metrics=km.incremental, summary=km.incremental_summary, score=km.seen_score,
)

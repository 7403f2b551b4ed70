"""Union-label streams (X-TAIL style): several datasets in sequence, classified over the union of ALL their
class names through text prompts.

Why a kind of its own: the label space is the union of every dataset's classes from the start (X-TAIL gives no
dataset id at test time), and the metrics (`cl.engine.kind_metrics.union_label`: X-TAIL's Transfer, Average, Last) need the zero-shot accuracy on
datasets not learned yet. Global class ids are offset per dataset; `StreamInfo.class_names` holds the names the
strategies turn into prompts: `extra["prompt_templates"]` holds one template per class (a dataset's own
`prompt_template`, else the reader's, e.g. the X-TAIL datasets' reference templates, else the scenario's).

Dataset sources: `synthetic` (procedural, `scenario=synthetic-xtail`) and `xtail` (the ten X-TAIL datasets from local
folders in the CoOp layout, scenarios/datasets/xtail_data.py; `scenario=xtail`).
"""
from __future__ import annotations

import numpy as np

from cl.engine import kind_metrics as km
from cl.engine.errors import ConfigError
from cl.engine.kinds import EvalProtocol, Kind
from cl.engine.stream import Experience, Stream, StreamInfo

from cl.engine.in_memory import TensorImageDataset
from scenarios.datasets.synthetic import make_synthetic


def _synthetic_domain(spec: dict, offset: int, limit):
    params = {k: spec[k] for k in ("n_classes", "image_size", "train_per_class", "test_per_class", "noise", "seed")
              if k in spec}
    train, test = make_synthetic(**params)
    out = []
    for ds in (train, test):
        y = np.asarray(ds.targets)
        keep = np.arange(len(y))
        if limit:
            keep = np.concatenate([np.nonzero(y == c)[0][: int(limit)] for c in np.unique(y)])
            keep.sort()
        out.append(TensorImageDataset(ds.images[keep], y[keep] + offset))
    return out


def _limit(labels: np.ndarray, limit) -> np.ndarray:
    if not limit:
        return np.arange(len(labels))
    return np.sort(np.concatenate([np.nonzero(labels == c)[0][: int(limit)] for c in np.unique(labels)]))


def _xtail_domain(spec: dict, offset: int, cfg: dict, root):
    """(train, test, class names, template) of one X-TAIL dataset: few-shot train split, whole test split."""
    from scenarios.datasets.imagefolder import ImageFolderDataset
    from scenarios.datasets.xtail_data import few_shot, read_xtail

    train, test, names, template = read_xtail(str(spec.get("name")), root)
    shots = spec.get("shots", cfg.get("shots", 16))
    keep_train = few_shot(train.labels, shots, int(cfg.get("shot_seed", 42)))
    out = []
    for split, keep, is_train in ((train, keep_train, True), (test, np.arange(len(test.labels)), False)):
        keep = keep[_limit(split.labels[keep], cfg.get("limit_per_class"))]
        labels = split.labels[keep]
        if split.paths is None:  # MNIST: in memory
            out.append(TensorImageDataset(split.images[keep], labels + offset))
            continue
        index = {str(c): [split.paths[i] for i in keep[labels == c]] for c in range(len(names))}
        ds = ImageFolderDataset(root, int(cfg.get("image_size", 224)), train=is_train,
                                augment=str(cfg.get("augment", "none")), index=index)
        ds.samples = [(path, label + offset) for path, label in ds.samples]  # global ids of the union
        ds.targets = ds.targets + offset
        ds.class_names = list(names)
        out.append(ds)
    return out[0], out[1], names, template


def build_union_label(cfg: dict, data_root=None) -> Stream:
    from scenarios.datasets.registry import resolve_data_root

    datasets = list(cfg.get("datasets") or [])
    if not datasets:
        raise ConfigError("scenario.datasets is empty: list the datasets of the union-label stream in order")
    root = resolve_data_root(data_root) / str(cfg.get("root") or ".")
    default_template = cfg.get("prompt_template", "a photo of a {}.")
    exps, names, templates, offset, per_exp = [], [], [], 0, []
    for i, spec in enumerate(datasets):
        spec = dict(spec)
        source = spec.get("source", "synthetic")
        if source == "synthetic":
            cls_names = list(spec["class_names"])
            spec["n_classes"] = len(cls_names)
            train, test = _synthetic_domain(spec, offset, cfg.get("limit_per_class"))
            template = default_template
        elif source == "xtail":
            train, test, cls_names, template = _xtail_domain(spec, offset, cfg, root)
        else:
            raise ConfigError(f"union_label dataset source '{source}' unknown: expected synthetic or xtail")
        classes = list(range(offset, offset + len(cls_names)))
        exps.append(Experience(i, train, test, classes, "union_label", domain=spec.get("name", f"d{i}")))
        names += cls_names
        templates += [spec.get("prompt_template") or template] * len(cls_names)
        per_exp.append(classes)
        offset += len(cls_names)
    size = int(cfg.get("image_size") or datasets[0].get("image_size", 32))
    info = StreamInfo(name=cfg.get("name") or "union_label", kind="union_label", n_classes=offset,
                      n_experiences=len(exps), class_order=list(range(offset)), class_names=names,
                      input_shape=(3, size, size), classes_per_experience=per_exp,
                      extra={"domains": [e.domain for e in exps], "prompt_template": default_template,
                             "prompt_templates": templates})
    return Stream(exps, info, KIND.protocol)


KIND = Kind(
    name="union_label", build=build_union_label, protocol=EvalProtocol(),
    metrics=km.union_label, summary=km.union_label_summary, score=km.seen_score, matrix_labels=km.domain_labels,
)

"""Union-label streams (X-TAIL style): several datasets in sequence, classified over the union of ALL their
class names through text prompts.

Why a kind of its own: the label space is the union of every dataset's classes from the start (X-TAIL gives no
dataset id at test time), and the metrics (scenarios/union_label_metrics.py) need the zero-shot accuracy on
datasets not learned yet. Global class ids are offset per dataset; `StreamInfo.class_names` holds the names the
strategies turn into prompts (`prompt_template` in `extra`).
"""
from __future__ import annotations

import numpy as np

from cl.errors import ConfigError
from cl.stream import Experience, Stream, StreamInfo

from .in_memory import TensorImageDataset
from .synthetic import make_synthetic


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


def build_union_label(cfg: dict, data_root=None) -> Stream:
    datasets = list(cfg.get("datasets") or [])
    if not datasets:
        raise ConfigError("scenario.datasets is empty: list the datasets of the union-label stream in order")
    exps, names, offset, per_exp = [], [], 0, []
    for i, spec in enumerate(datasets):
        spec = dict(spec)
        if spec.get("source", "synthetic") != "synthetic":
            raise ConfigError(f"union_label dataset source '{spec.get('source')}' unknown: expected synthetic")
        cls_names = list(spec["class_names"])
        spec["n_classes"] = len(cls_names)
        train, test = _synthetic_domain(spec, offset, cfg.get("limit_per_class"))
        classes = list(range(offset, offset + len(cls_names)))
        exps.append(Experience(i, train, test, classes, "union_label", domain=spec.get("name", f"d{i}")))
        names += cls_names
        per_exp.append(classes)
        offset += len(cls_names)
    size = int(datasets[0].get("image_size", 32))
    info = StreamInfo(name=cfg.get("name") or "union_label", kind="union_label", n_classes=offset,
                      n_experiences=len(exps), class_order=list(range(offset)), class_names=names,
                      input_shape=(3, size, size), classes_per_experience=per_exp,
                      extra={"domains": [e.domain for e in exps],
                             "prompt_template": cfg.get("prompt_template", "a photo of a {}.")})
    return Stream(exps, info)

"""Features of frozen encoders, computed once per image and reused across experiences (issue 10).

Why: SimpleCIL, APER (after its first session) and MOS's first-session prototypes only ever look at images
through an encoder that no longer changes. Without a cache the trainer re-runs that ViT over every seen test set
after every experience (T(T+1)/2 test-set passes for T experiences); with it, each test image is encoded once.

The contract (cl/engine/strategy.py):
- `strategy.frozen_encoder()` returns `(key, encode)` when `predict(x) == predict_features(encode(x))` and
  `encode` will not change any more, else None. `key` names the encoder: a new key is a new encoder.
- `strategy.predict_features(features, task_id)` is `predict` from those features.
- The trainer attaches a `FeatureCache` as `strategy.feature_cache` (`trainer.feature_cache`, default on) and
  evaluates from cached features whenever `frozen_encoder()` is not None.
- A strategy's own extraction (prototypes at the end of an experience) goes through `features_of`, which uses
  the attached cache when there is one and a plain extraction otherwise.

Entries are keyed by (encoder key, the dataset object, autocast dtype) and hold the whole dataset's features, so
a dataset is encoded in one pass (the evaluation transform, fixed order). The cache holds a reference to each
dataset it has seen, so an id is never reused while its entry lives; it lives as long as one `Trainer.fit`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from cl.engine.features import extract_features

Encode = Callable[[torch.Tensor], torch.Tensor]


class FeatureCache:
    """(key, dataset, dtype) -> (features fp32 [N, D], labels [N]) on the device; `images_encoded` counts work."""

    def __init__(self, device: torch.device, batch_size: int = 256, autocast_dtype: torch.dtype | None = None):
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.autocast_dtype = autocast_dtype
        self._entries: dict[tuple, tuple[Dataset, torch.Tensor, torch.Tensor]] = {}
        self.images_encoded = 0
        self.hits = 0

    def features(self, key: str, encode: Encode, dataset: Dataset, *, input_size: int, in_chans: int,
                 autocast_dtype: torch.dtype | None | str = "default", batch_size: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.autocast_dtype if autocast_dtype == "default" else autocast_dtype
        slot = (key, id(dataset), dtype)
        entry = self._entries.get(slot)
        if entry is not None and entry[0] is dataset:
            self.hits += 1
            return entry[1], entry[2]
        feats, labels = extract_features(encode, dataset, device=self.device, input_size=input_size,
                                         in_chans=in_chans, batch_size=batch_size or self.batch_size,
                                         autocast_dtype=dtype)
        self._entries[slot] = (dataset, feats, labels)
        self.images_encoded += len(labels)
        return feats, labels

    def clear(self) -> None:
        self._entries.clear()


def features_of(strategy, key: str | None, encode: Encode, dataset: Dataset, *, device: torch.device,
                batch_size: int = 256, autocast_dtype: torch.dtype | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode` over `dataset` (eval transform): through `strategy.feature_cache` when attached and `key` is given
    (the encoder is frozen), else a plain extraction. Same numbers either way."""
    backbone = strategy.backbone
    cache: FeatureCache | None = getattr(strategy, "feature_cache", None)
    if cache is not None and key is not None:
        return cache.features(key, encode, dataset, input_size=backbone.input_size, in_chans=backbone.in_chans,
                              autocast_dtype=autocast_dtype, batch_size=batch_size)
    return extract_features(encode, dataset, device=device, input_size=backbone.input_size,
                            in_chans=backbone.in_chans, batch_size=batch_size, autocast_dtype=autocast_dtype)

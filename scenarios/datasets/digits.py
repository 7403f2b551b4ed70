"""scikit-learn's bundled 8x8 digits: a real dataset that needs no files, for smoke runs and tests."""
from __future__ import annotations

import numpy as np

from cl.engine.in_memory import TensorImageDataset

# Fixed, independent of the run seed: every seed is scored on the same test images.
SPLIT_RANDOM_STATE = 0
TEST_FRACTION = 0.2


def load_digits_dataset() -> tuple[TensorImageDataset, TensorImageDataset]:
    """(train, test): uint8 [N, 1, 8, 8] images (0..16 scaled to 0..255), stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_RANDOM_STATE
    )
    names = [str(c) for c in range(10)]
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return (
        TensorImageDataset(images[train_idx], labels[train_idx], class_names=names),
        TensorImageDataset(images[test_idx], labels[test_idx], class_names=names),
    )

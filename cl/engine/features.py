"""Feature extraction over a dataset with the evaluation transform (prototypes, statistics, LDA heads)."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from cl.engine.data import make_loader, to_model_input
from cl.engine.stream import eval_view


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, *, device: torch.device,
                     input_size: int, in_chans: int, batch_size: int = 256, autocast_dtype=None,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode` over every sample of `dataset` (eval transform, fixed order) -> (features fp32, labels)."""
    loader = make_loader(eval_view(dataset), batch_size=batch_size, shuffle=False, desc="feature extraction")
    feats, labels = [], []
    for x, y in loader:
        x = to_model_input(x, input_size, in_chans, device)
        if autocast_dtype is not None:
            with torch.autocast(device.type, dtype=autocast_dtype):
                f = encode(x)
        else:
            f = encode(x)
        feats.append(f.float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums divided by counts, in one scatter: (means [n_classes, D], counts [n_classes])."""
    sums = torch.zeros(n_classes, features.shape[1], device=features.device, dtype=torch.float64)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=n_classes)
    means = sums / counts.clamp(min=1).unsqueeze(1)
    return means.float(), counts


def class_gaussian(features: torch.Tensor, mode: str = "covariance", ridge: float = 1e-4,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance (+ridge*I) of one class's features, or the diagonal only (`mode="variance"`).

    MOS and other analytic classifier-alignment methods sample pseudo-features from these Gaussians."""
    f = features.double()
    mean = f.mean(0)
    cov = torch.cov(f.T) + ridge * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    if mode == "variance":
        return mean.float(), torch.diagonal(cov).float()
    if mode != "covariance":
        raise ValueError(f"unknown statistics mode {mode!r}: expected covariance or variance")
    return mean.float(), cov.float()

"""The dataset contract every scenario builder relies on, and the datasets that ship with clbench.

Contract (any `torch.utils.data.Dataset` a loader hands to the builders):

- `ds[i]` returns `(x, y)`: `x` is a **uint8 tensor [C, H, W]** whose size is fixed within the dataset
  (the trainer converts to float and resizes on the device, in batches), `y` an `int` in the dataset's own
  label space `0..K-1`. Labels are never remapped: they are the stream's global class ids.
- `ds.targets`: a 1-D numpy int64 array of every label, so builders select samples without decoding images.
- optional `ds.class_names` (list of K strings), `ds.input_shape` (the `(C, H, W)` of every `x`; read from
  `ds[0]` when absent), `ds.domains` (one domain id per sample, for domain-IL) and `ds.eval_view()` (the same
  samples with the evaluation transform, for datasets that augment in training).

This module gathers the implementations, each in its own module, so callers import from one place.
"""
from scenarios.datasets.digits import load_digits_dataset
from scenarios.datasets.imagefolder import IMAGE_EXTENSIONS, ImageFolderDataset, read_imagefolder_split
from cl.engine.in_memory import TensorImageDataset, input_shape_of
from cl.engine.subset import TargetSubset
from scenarios.datasets.synthetic import make_synthetic

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderDataset",
    "TargetSubset",
    "TensorImageDataset",
    "input_shape_of",
    "load_digits_dataset",
    "make_synthetic",
    "read_imagefolder_split",
]

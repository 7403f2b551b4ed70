"""The uint8 decode-once image cache and PILOT's training augmentation in batches on the device (issue 10).

Why: the reference frameworks decode a JPEG and run RandomResizedCrop + flip in PIL for every image of every
epoch on the CPU (~250 images/s for MOS on an H100 that could train at ~2,700). Here each image is decoded once:

- **train array** `[N, 3, S, S]` uint8: the whole image, resized (PIL bilinear, antialiased) to S x S, with its
  original `(H, W)` kept beside it. S (`scenario.image_cache_size`, default 2 x image_size = 448 for 224) is
  above the long side of the PILOT-family images (ImageNet-R's are ~400 x 300), so a crop taken from the cached
  copy sees at least the original's pixels along both axes: the reference's crops stay valid.
- **eval array** `[N, 3, size, size]` uint8: exactly the reference's test transform (bicubic resize of the short
  side to size*256/224, centre crop), byte for byte the tensor the uncached dataset returns.

Both are `np.memmap` files under `CLBENCH_CACHE_DIR` (default `~/.cache/clbench/images`), in a folder named by a
hash of the file list (paths, sizes, mtimes) and the sizes, written to a temporary name and renamed when complete.

Augmentation: `random_resized_crop_box` samples the crop exactly as torchvision's RandomResizedCrop (Inception
crop: 10 tries of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`, then a centre-crop
fallback), in the original image's pixel grid and from the same global torch RNG draws in the same order, then
the flip as RandomHorizontalFlip draws it (`torch.rand(1) < 0.5`). The item carries the box (fractions of H and
W) and the flip; `device_augment` crops and resizes the whole batch at once on the device with
`torchvision.ops.roi_align` (bilinear; adaptive sampling averages over each output pixel's footprint, the
antialiasing PIL's resize does when a crop is shrunk) and rounds to uint8 levels as PIL's output is.
The one departure from the reference: the crop is resampled from the S x S copy instead of the original file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from cl.engine.errors import ConfigError, DatasetError

CACHE_VERSION = 1
PILOT_SCALE = (0.05, 1.0)
PILOT_RATIO = (3 / 4, 4 / 3)


def cache_root() -> Path:
    return Path(os.environ.get("CLBENCH_CACHE_DIR", Path.home() / ".cache" / "clbench" / "images"))


# --- the augmentation's parameters (CPU, per item) ------------------------------------------------
def random_resized_crop_box(height: int, width: int, scale: Sequence[float] = PILOT_SCALE,
                            ratio: Sequence[float] = PILOT_RATIO) -> tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception crop of an H x W image, drawn like torchvision's RandomResizedCrop."""
    area = height * width
    log_ratio = torch.log(torch.tensor((float(ratio[0]), float(ratio[1]))))
    lo, hi = float(log_ratio[0]), float(log_ratio[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(lo, hi).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,)).item())
            left = int(torch.randint(0, width - w + 1, size=(1,)).item())
            return top, left, h, w
    # Fallback: the largest centred crop whose aspect ratio is inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# --- the batched crop + resize + flip on the device -----------------------------------------------
def device_augment(x: dict, size: int, channels: int, device: torch.device) -> torch.Tensor:
    """A collated batch of `ImageCache.train_item`s -> float [B, channels, size, size] in [0, 1] on `device`."""
    from torchvision.ops import roi_align

    image = x["image"].to(device, non_blocking=True).float()
    b, c, sh, sw = image.shape
    box = x["box"].to(device, non_blocking=True).float()  # (top, left, bottom, right) as fractions of H, W
    rois = torch.stack([torch.arange(b, device=device, dtype=image.dtype),
                        box[:, 1] * sw, box[:, 0] * sh, box[:, 3] * sw, box[:, 2] * sh], dim=1)
    out = roi_align(image, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = x["flip"].to(device, non_blocking=True).bool().view(-1, 1, 1, 1)
    out = torch.where(flip, out.flip(-1), out)
    out = out.round_().clamp_(0, 255).div_(255.0)  # PIL's output is uint8: the same levels
    if c != channels:
        if c != 1:
            raise ValueError(f"images have {c} channels, the backbone expects {channels}")
        out = out.expand(-1, channels, -1, -1)
    return out


def model_input(x, size: int, channels: int, device: torch.device) -> torch.Tensor:
    """`cl.engine.data.to_model_input`, plus the cached datasets' augmenting items (dicts) -> `device_augment`."""
    if isinstance(x, dict):
        return device_augment(x, size, channels, device)
    from cl.engine.data import to_model_input

    return to_model_input(x, size, channels, device)


# --- the on-disk cache ----------------------------------------------------------------------------
class ImageCache:
    """Decoded images of one file list: `eval_array` always, `train_array` + `sizes` when built for training."""

    def __init__(self, folder: Path, n: int, image_size: int, cache_size: int | None):
        self.folder, self.n, self.image_size, self.cache_size = folder, n, image_size, cache_size
        self.eval_array = np.memmap(folder / "eval.u8", dtype=np.uint8, mode="r", shape=(n, 3, image_size, image_size))
        self.train_array = self.sizes = None
        if cache_size:
            self.train_array = np.memmap(folder / "train.u8", dtype=np.uint8, mode="r",
                                         shape=(n, 3, cache_size, cache_size))
            self.sizes = np.load(folder / "sizes.npy")

    def eval_item(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.eval_array[i]))

    def train_item(self, i: int, scale=PILOT_SCALE, ratio=PILOT_RATIO) -> dict:
        if self.train_array is None:
            raise RuntimeError("this image cache was built without its training array")
        h, w = (int(v) for v in self.sizes[i])
        top, left, ch, cw = random_resized_crop_box(h, w, scale, ratio)
        flip = bool(torch.rand(1) < 0.5)
        box = torch.tensor([top / h, left / w, (top + ch) / h, (left + cw) / w], dtype=torch.float32)
        return {"image": torch.from_numpy(np.array(self.train_array[i])), "box": box, "flip": torch.tensor(flip)}


def _key(paths: Sequence[str], image_size: int, cache_size: int | None) -> str:
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, image_size, cache_size]).encode())
    for p in paths:
        st = os.stat(p)
        digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _decode(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode this image while building the image cache "
                           f"({type(e).__name__}: {e}); replace or delete it and run the same command") from None


def build_image_cache(paths: Sequence[str], image_size: int, cache_size: int | None, *,
                      workers: int | None = None) -> ImageCache:
    """Decodes every file once into the memory-mapped arrays (or reuses a complete cache of the same files)."""
    from cl.engine.transforms import eval_transform  # the reference's test transform, applied once per image

    if cache_size is not None and cache_size < image_size:
        raise ConfigError(f"scenario.image_cache_size={cache_size} is below image_size={image_size}: "
                          f"use at least {image_size} (default {2 * image_size})")
    folder = cache_root() / _key(paths, image_size, cache_size)
    n = len(paths)
    if (folder / "done").exists():
        return ImageCache(folder, n, image_size, cache_size)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    evals = np.memmap(tmp / "eval.u8", dtype=np.uint8, mode="w+", shape=(max(n, 1), 3, image_size, image_size))
    trains = (np.memmap(tmp / "train.u8", dtype=np.uint8, mode="w+", shape=(max(n, 1), 3, cache_size, cache_size))
              if cache_size else None)
    sizes = np.zeros((n, 2), dtype=np.int32)
    to_eval = eval_transform(image_size)

    def one(i: int) -> None:
        rgb = _decode(paths[i])
        evals[i] = to_eval(rgb).numpy()
        if trains is not None:
            sizes[i] = (rgb.height, rgb.width)
            full = rgb.resize((cache_size, cache_size), Image.BILINEAR)
            trains[i] = np.asarray(full).transpose(2, 0, 1)

    from cl.engine.progress import watch

    with ThreadPoolExecutor(max_workers=workers or min(8, (os.cpu_count() or 1) + 2)) as pool:
        for _ in watch(pool.map(one, range(n)), desc="building the image cache", total=n, unit="image"):
            pass
    evals.flush()
    if trains is not None:
        trains.flush()
        np.save(tmp / "sizes.npy", sizes)
    (tmp / "done").write_text(json.dumps({"n": n, "image_size": image_size, "cache_size": cache_size}))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same cache first: use theirs
        if not (folder / "done").exists():
            raise
    return ImageCache(folder, n, image_size, cache_size)


IMAGE_CACHE_MODES = (False, True, "exact")


def _estimate_gb(n: int, image_size: int, cache_size: int | None) -> float:
    return n * 3 * (image_size ** 2 + (cache_size or 0) ** 2) / 1e9


def attach_image_cache(datasets: Sequence, cfg: dict, log=None) -> None:
    """`scenario.image_cache`: ImageFolder datasets among `datasets` read from a decode-once cache.

    - `exact` (the ImageFolder benchmarks' default): every image the model sees through the evaluation transform
      (test sets, prototype and statistics passes over training data) comes from the cache, byte for byte what the
      file path gives; augmented training images are still decoded from the files, so nothing changes but speed.
    - `true`: training crops come from the cache too (`device_augment`; the one departure: crops are resampled
      from the S x S copy), opt-in.
    - `false`: no cache.
    The cache is skipped with a one-line warning when it would exceed `scenario.image_cache_max_gb` (default 50)."""
    enabled = cfg.get("image_cache", False)
    if enabled not in IMAGE_CACHE_MODES or isinstance(enabled, int) and not isinstance(enabled, bool):
        raise ConfigError(f"scenario.image_cache must be true or false or exact, got {enabled!r}")
    if not enabled:
        return
    size = cfg.get("image_cache_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ConfigError(f"scenario.image_cache_size must be a positive integer or null, got {size!r}")
    budget = cfg.get("image_cache_max_gb", 50)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise ConfigError(f"scenario.image_cache_max_gb must be a positive number, got {budget!r}")
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    plans = []
    for ds in datasets:
        paths = [p for p, _ in getattr(ds, "samples", [])]
        if not paths or not hasattr(ds, "image_size"):
            continue
        augmenting = ds.train and ds.augment == "pilot"
        train_size = (size or 2 * ds.image_size) if augmenting and enabled is True else None
        plans.append((ds, paths, train_size))
    need = sum(_estimate_gb(len(p), ds.image_size, t) for ds, p, t in plans)
    if need > budget:
        log(f"warning: the image cache would take {need:.1f} GB, above scenario.image_cache_max_gb={budget}: "
            f"reading the image files instead (raise the budget, or set scenario.image_cache=false to silence this)")
        return
    for ds, paths, train_size in plans:
        folder = cache_root() / _key(paths, ds.image_size, train_size)
        reused = (folder / "done").exists()
        ds.cache = build_image_cache(paths, ds.image_size, train_size)
        log(f"image cache: {folder} ({len(paths)} images, {_estimate_gb(len(paths), ds.image_size, train_size):.2f} "
            f"GB, {'reused' if reused else 'built'}; CLBENCH_CACHE_DIR moves it)")

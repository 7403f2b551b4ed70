"""Image transforms shared by the dataset readers and the engine's image cache (which must apply the same one)."""
from __future__ import annotations

from torchvision.transforms import v2


def eval_transform(image_size: int) -> v2.Compose:
    """PILOT's test transform: bicubic resize of the short side to size*256/224, centre crop, uint8."""
    return v2.Compose([
        v2.Resize(int(image_size * 256 / 224), interpolation=v2.InterpolationMode.BICUBIC),
        v2.CenterCrop(image_size),
        v2.PILToTensor(),
    ])

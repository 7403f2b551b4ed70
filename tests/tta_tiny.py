"""The tiny BN classifier the CTTA reference-step tests adapt (tests/test_reference_{cotta,psmt}.py)."""
import torch
from torch import nn


class Tiny(nn.Module):
    """A BN classifier as the source models are (convs without bias before BN, a linear head)."""
    is_classifier = True
    input_size, in_chans = 8, 3

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.SiLU(),
                               nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.f(x)


def source_model(source_statistics: bool = False) -> Tiny:
    """Seeded weights with non-trivial BN affines; `source_statistics` also moves the running means (statistics an
    adaptation that normalises with the test batch must not use)."""
    torch.manual_seed(0)
    m = Tiny()
    with torch.no_grad():
        for bn in (m.f[1], m.f[4]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            if source_statistics:
                bn.running_mean.uniform_(-1, 1)
    return m

"""CoTTA's augmentation against the reference chain (issue 19, defect 3), and the view-wise batch norm against
V separate passes (defect 2).

The reference (qinenergy/cotta cifar/cotta.py:22-45 and my_transforms.py:79-116) is re-stated here with
torchvision's own functional ops, one view at a time, with the parameters the batched implementation drew."""
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from cl.models.viewwise_bn import viewwise_bn
from strategies.cotta import apply_views, draw_view_params

pytestmark = pytest.mark.unit


def reference_view(x, p, i, noise):
    """One view of the reference chain on the batch x with view i's parameters (torchvision functional ops)."""
    img = x.clamp(0.0, 1.0)                                      # my_transforms.Clip (cotta.py:23)
    for fn_id in p["order"][i].tolist():                         # ColorJitterPro: randperm(5) (my_transforms:87)
        if fn_id == 0:
            img = TF.adjust_brightness(img, float(p["brightness"][i]))
        elif fn_id == 1:
            img = TF.adjust_contrast(img, float(p["contrast"][i]))
        elif fn_id == 2:
            img = TF.adjust_saturation(img, float(p["saturation"][i]))
        elif fn_id == 3:
            img = TF.adjust_hue(img, float(p["hue"][i]))
        else:                                                    # my_transforms.py:112-114
            img = TF.adjust_gamma(img.clamp(1e-8, 1.0), float(p["gamma"][i]))
    n_pixels = x.shape[-1]
    img = TF.pad(img, padding=int(n_pixels / 2), padding_mode="edge")            # cotta.py:31
    img = TF.affine(img, angle=float(p["angle"][i]), translate=[int(p["tx"][i]), int(p["ty"][i])],
                    scale=float(p["scale"][i]), shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR)                      # cotta.py:32-39
    sigma = float(p["sigma"][i])
    img = TF.gaussian_blur(img, kernel_size=[5, 5], sigma=[sigma, sigma])          # cotta.py:40
    img = TF.center_crop(img, [n_pixels, n_pixels])                              # cotta.py:41
    if bool(p["flip"][i]):
        img = TF.hflip(img)                                                      # cotta.py:42
    return (img + noise).clamp(0.0, 1.0)                                         # cotta.py:43-44


@pytest.mark.parametrize("size", [16, 32])
def test_views_equal_the_reference_chain(size):
    torch.manual_seed(0)
    x = torch.rand(3, 3, size, size)
    n = 12
    p = draw_view_params(n, size, size, torch.Generator().manual_seed(1))
    # extreme affine draws too: the corners of the padded image fall outside it (zero fill) at scale 0.9
    p["scale"][0], p["tx"][0], p["ty"][0], p["angle"][0] = 0.9, -size // 8, size // 8, 15.0
    noise = torch.randn(n * 3, 3, size, size) * 0.005
    ours = apply_views(x, p, noise=noise).view(n, 3, 3, size, size)
    for i in range(n):
        ref = reference_view(x, p, i, noise.view(n, 3, 3, size, size)[i])
        assert torch.allclose(ours[i], ref, atol=2e-5), (i, (ours[i] - ref).abs().max())


def test_view_parameters_cover_the_reference_ranges():
    p = draw_view_params(4000, 32, 32, torch.Generator().manual_seed(0))
    assert p["tx"].abs().max() == 4 and p["ty"].abs().max() == 4   # ±2W/16: 1/16 of the padded 64 px
    assert set(p["tx"].tolist()) == set(range(-4, 5))              # whole pixels (torchvision rounds)
    assert 0.59 < p["brightness"].min() and p["brightness"].max() < 1.41
    assert -0.061 < p["hue"].min() < -0.055 and 0.055 < p["hue"].max() < 0.061
    assert 0.4 < p["flip"].float().mean() < 0.6
    firsts = torch.bincount(p["order"][:, 0], minlength=5).float() / 4000  # a random order per view
    assert (firsts > 0.15).all() and (firsts < 0.25).all()
    assert all(sorted(r) == [0, 1, 2, 3, 4] for r in p["order"].tolist())


def _bn_net(track=False):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=track), nn.ReLU(),
                        nn.Conv2d(6, 8, 3, stride=2), nn.BatchNorm2d(8, track_running_stats=track), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.BatchNorm1d(5, track_running_stats=track))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net.train()


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_viewwise_bn_equals_separate_passes_forward_and_backward(impl):
    v, b = 4, 6
    x = torch.randn(v * b, 3, 8, 8) * 2 + 1
    net = _bn_net()
    with torch.no_grad():  # fp32 forward: to 1e-5
        with viewwise_bn(net, v, impl):
            one = net(x)
        assert torch.allclose(one, torch.cat([net(c) for c in x.chunk(v)]), atol=1e-5)
        assert not torch.allclose(net(x), one, atol=1e-3)  # outside the block: ordinary pooled statistics again
    net, x = net.double(), x.double()  # gradients in fp64: equal to rounding (fp32 rounding grows through BN)
    sep = torch.cat([net(c) for c in x.chunk(v)])
    (sep ** 2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with viewwise_bn(net, v, impl):
        one = net(x)
    (one ** 2).sum().backward()
    assert torch.allclose(one, sep, atol=1e-12)
    for g, p in zip(grads, net.parameters()):
        assert torch.allclose(p.grad, g, atol=1e-10)


@pytest.mark.parametrize("impl", ["loop", "fused"])
def test_viewwise_bn_updates_running_stats_as_separate_passes(impl):
    a, b = _bn_net(track=True), _bn_net(track=True)
    for m in (a, b):
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.momentum = None if bn.num_features == 8 else 0.3  # cumulative average and momentum
    x = torch.randn(3 * 5, 3, 8, 8)
    with torch.no_grad():
        for c in x.chunk(3):
            a(c)
        with viewwise_bn(b, 3, impl):
            b(x)
    for (name, s), t in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(s.float(), t.float(), atol=1e-6), name
    with torch.no_grad():  # eval mode with running statistics: batch independent, unchanged by the block
        a.eval()
        with viewwise_bn(a, 3, impl):
            assert torch.allclose(a(x), torch.cat([a(c) for c in x.chunk(3)]), atol=1e-6)


def test_viewwise_bn_rejects_unequal_views_and_restores_the_modules():
    net = _bn_net()
    with pytest.raises(ValueError, match="equal views"):
        with viewwise_bn(net, 4):
            net(torch.randn(6, 3, 8, 8))
    assert all("forward" not in m.__dict__ for m in net.modules())

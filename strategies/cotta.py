"""CoTTA (Wang et al., CVPR 2022), qinenergy/cotta `cifar/cotta.py` and `imagenet/cotta.py`.

    configure: BN on batch statistics, every weight/bias trainable; student f_θ, teacher f_θ' (EMA), anchor f_θ0
    per batch x:
      s  = f_θ(x)
      c  = mean_batch max softmax f_θ0(x)                       (one batch-level scalar)
      t  = mean_n f_θ'(aug_n(x)) if c < p_th else f_θ'(x)        (n_aug = 32 views, each its own BN statistics)
      L  = mean CE(softmax(t) -> s)  (symmetric CE on ImageNet: loss: sce);  one optimizer step
      θ' <- α θ' + (1-α) θ;   θ <- m θ0 + (1-m) θ, m ~ Bernoulli(p) per element   (cl.models.ema.MeanTeacher.step)
      return t                                                   (the teacher's prediction, made before the step)

The views. The reference runs 32 teacher passes of one view each (cifar/cotta.py:103-105), so every view is
normalised with its own batch statistics. Here the views are made on the device in one [32*B] tensor and the
teacher sees them in ONE pass through `cl.models.viewwise_bn` (each view's B-chunk normalised by its own statistics):
exactly the 32 passes (tested to 1e-5; `view_pass: sequential` runs the 32 passes, `pooled` the old pooled
statistics, for comparison only). The teacher keeps no running statistics, as in the reference.

The augmentation (`augment_views`) is the reference's chain (cifar/cotta.py:14-46, my_transforms.py), one random
parameter set per view for the whole batch (the reference transforms a batched tensor): ColorJitterPro with its
five ops (brightness 0.6-1.4, contrast 0.7-1.3, saturation 0.5-1.5, hue ±0.06, gamma 0.7-1.3) in a random order
per view (`torch.randperm(5)`, my_transforms.py:87), contrast and saturation against torchvision's luminance grey
(0.2989 R + 0.587 G + 0.114 B), gamma after clamping to [1e-8, 1]; edge padding by W/2 (image 2W), RandomAffine
(±15°, translation up to 1/16 of the PADDED size, i.e. ±2W/16, whole pixels; scale 0.9-1.1; bilinear, zero fill),
Gaussian blur (kernel 5, σ 0.001-0.5), centre crop W, horizontal flip p 0.5, Gaussian noise σ 0.005, clip [0, 1].
Only the part of the padded image the crop and the blur read is computed (W+4 square), sampled from the
unpadded image (edge padding = border sampling; the zero fill beyond the padded image as a weight). Compared to torchvision's
functional ops with the same parameters in tests/test_cotta_augment.py. Remaining differences (docs/tta.md):
the random draws come from torch's generator in a batched order (the reference: numpy/torch per call), so the
same seed gives other views; the 32 views run only when c < p_th (the ImageNet code and mariodoebler; the CIFAR
code computes and discards them otherwise, which only consumes random numbers).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cl.models.ema import MeanTeacher
from cl.engine.errors import ConfigError
from cl.models.viewwise_bn import viewwise_bn
from strategies.tta_base import TTAStrategy, soft_ce, use_batch_stats

# qinenergy/cotta cifar/cotta.py:22-45 (not `soft`)
JITTER = {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
          "gamma": (0.7, 1.3)}
JITTER_OPS = ("brightness", "contrast", "saturation", "hue", "gamma")  # ColorJitterPro's fn_id 0..4
DEGREES, TRANSLATE, SCALE, BLUR_SIGMA, BLUR_KERNEL, FLIP_P, NOISE_STD = 15.0, 1 / 16, (0.9, 1.1), (0.001, 0.5), 5, 0.5, 0.005
GREY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
VIEW_PASSES = ("viewwise", "sequential", "pooled")


def draw_view_params(n: int, height: int, width: int, generator: torch.Generator | None = None) -> dict:
    """One parameter set per view (CPU tensors): jitter order and factors, affine, blur, flip."""
    def u(lo, hi, *shape):
        return torch.rand(*(shape or (n,)), generator=generator, dtype=torch.float64) * (hi - lo) + lo

    p = {"order": torch.rand(n, 5, generator=generator).argsort(1)}
    for k in JITTER_OPS:
        p[k] = u(*JITTER[k])
    ph, pw = height + 2 * (height // 2), width + 2 * (width // 2)  # the padded image (2W)
    p["angle"] = u(-DEGREES, DEGREES)
    p["tx"] = torch.round(u(-TRANSLATE * pw, TRANSLATE * pw))  # whole pixels, as torchvision's RandomAffine
    p["ty"] = torch.round(u(-TRANSLATE * ph, TRANSLATE * ph))
    p["scale"] = u(*SCALE)
    p["sigma"] = u(*BLUR_SIGMA)
    p["flip"] = torch.rand(n, generator=generator) < FLIP_P
    return p


def _grey(v: torch.Tensor) -> torch.Tensor:
    """Luminance grey [..., 1, H, W] of RGB (channel dim -3); a one-channel image is its own grey."""
    if v.shape[-3] != 3:
        return v.mean(-3, keepdim=True)
    r, g, b = v.unbind(-3)
    return (GREY[0] * r + GREY[1] * g + GREY[2] * b).unsqueeze(-3)


def _shift_hue(v: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images by f (a fraction of the circle)."""
    if v.shape[-3] != 3:
        return v
    hi, lo = v.amax(-3), v.amin(-3)
    delta = hi - lo
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = v.unbind(-3)
    h = torch.where(hi == r, ((g - b) / safe) % 6,
                    torch.where(hi == g, (b - r) / safe + 2, (r - g) / safe + 4))
    h = torch.where(delta > 0, h / 6, torch.zeros_like(h))
    h = (h + f.view(-1, *[1] * (h.dim() - 1))) % 1.0
    s = delta / torch.where(hi > 0, hi, torch.ones_like(hi))
    out = []
    for n in (5.0, 3.0, 1.0):  # HSV -> RGB: V - V S max(0, min(k, 4 - k, 1)), k = (n + 6H) mod 6
        k = (n + 6 * h) % 6
        out.append(hi - hi * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, -3)


def _jitter(v: torch.Tensor, op: str, f: torch.Tensor) -> torch.Tensor:
    """One ColorJitterPro op on views v [m, B, C, H, W] with per-view factors f [m] (torchvision's formulas)."""
    fb = f.view(-1, 1, 1, 1, 1)
    if op == "brightness":
        return (fb * v).clamp(0, 1)
    if op == "contrast":
        mean = _grey(v).mean(dim=(-3, -2, -1), keepdim=True)  # per image
        return (fb * v + (1 - fb) * mean).clamp(0, 1)
    if op == "saturation":
        return (fb * v + (1 - fb) * _grey(v)).clamp(0, 1)
    if op == "hue":
        return _shift_hue(v, f)
    return (v.clamp(1e-8, 1.0) ** fb).clamp(0, 1)  # gamma (my_transforms.py:112-114)


def _affine_grid(p: dict, h: int, w: int, margin: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling grid [n, h+2m, w+2m, 2] for the crop plus a blur margin, and the zero-fill weight [n, h+2m,
    w+2m]. torchvision's inverse affine map about the centre of the PADDED image (2H x 2W), sampled from the
    unpadded image: inside the padded image, edge padding = `grid_sample(padding_mode="border")` of the image
    itself; beyond its last pixel centres, bilinear sampling with zero fill (the reference's `fillcolor=None`)
    fades to 0 over one pixel, which is the weight. So the padded image is never built."""
    ph, pw, top, left = h + 2 * (h // 2), w + 2 * (w // 2), h // 2, w // 2
    ys = torch.arange(h + 2 * margin, dtype=torch.float64) + top - margin + 0.5 - ph / 2  # pixel centres, centred
    xs = torch.arange(w + 2 * margin, dtype=torch.float64) + left - margin + 0.5 - pw / 2
    rot = p["angle"] * math.pi / 180
    c = (torch.cos(rot) / p["scale"]).view(-1, 1, 1)
    sn = (torch.sin(rot) / p["scale"]).view(-1, 1, 1)
    x = xs.view(1, 1, -1) - p["tx"].view(-1, 1, 1)
    y = ys.view(1, -1, 1) - p["ty"].view(-1, 1, 1)
    u = c * x + sn * y + pw / 2 - 0.5  # source position in the padded image's pixel indices
    v = -sn * x + c * y + ph / 2 - 0.5
    weight = ((u + 1).minimum(pw - u).clamp(0, 1) * (v + 1).minimum(ph - v).clamp(0, 1))
    gx = (2 * (u - left) + 1) / w - 1  # the same position in the unpadded image, grid_sample's coordinates
    gy = (2 * (v - top) + 1) / h - 1
    return (torch.stack([gx, gy], -1).to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype))


def _blur(v: torch.Tensor, sigma: torch.Tensor, k: int) -> torch.Tensor:
    """Separable Gaussian blur, valid part only: [m, B, C, H+k-1, W+k-1] -> [m, B, C, H, W], σ per view."""
    t = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1)) ** 2)
    w = (w / w.sum(1, keepdim=True)).to(device=v.device, dtype=v.dtype)  # [m, k]
    hh, ww = v.shape[-2] - k + 1, v.shape[-1] - k + 1
    wb = w.view(-1, 1, 1, 1, 1, k)
    rows = sum(wb[..., i] * v[..., :, i:i + ww] for i in range(k))
    return sum(wb[..., i] * rows[..., i:i + hh, :] for i in range(k))


def apply_views(x: torch.Tensor, p: dict, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The augmented views [n*B, C, H, W] of x [B, C, H, W] with parameters p (draw_view_params); view v is rows
    v*B..(v+1)*B. noise: [n*B, C, H, W] or None (drawn, σ 0.005, with `generator` on x's device)."""
    n = p["order"].shape[0]
    b, c, h, w = x.shape
    v = x.clamp(0, 1).unsqueeze(0).expand(n, b, c, h, w).contiguous()
    order = p["order"].tolist()
    for step in range(5):
        for op_id, op in enumerate(JITTER_OPS):
            idx = [i for i in range(n) if order[i][step] == op_id]
            if not idx:
                continue
            if len(idx) == n:
                v = _jitter(v, op, p[op].to(v.device, v.dtype))
            else:
                sel = torch.tensor(idx, device=v.device)
                v = v.index_copy(0, sel, _jitter(v.index_select(0, sel), op, p[op][idx].to(v.device, v.dtype)))
    m = BLUR_KERNEL // 2
    grid, fill = _affine_grid(p, h, w, m, v.dtype, v.device)  # [n, h+2m, w+2m, 2], [n, h+2m, w+2m]
    grid = grid.unsqueeze(1).expand(n, b, *grid.shape[1:]).reshape(n * b, *grid.shape[1:])
    canvas = F.grid_sample(v.view(n * b, c, h, w), grid, mode="bilinear", padding_mode="border", align_corners=False)
    canvas = canvas.view(n, b, c, h + 2 * m, w + 2 * m) * fill.view(n, 1, 1, h + 2 * m, w + 2 * m)
    v = _blur(canvas, p["sigma"], BLUR_KERNEL)
    flip = p["flip"].to(v.device).view(n, 1, 1, 1, 1)
    v = torch.where(flip, v.flip(-1), v).reshape(n * b, c, h, w)
    if noise is None:
        noise = torch.randn(v.shape, generator=generator, device=v.device, dtype=v.dtype) * NOISE_STD
    return (v + noise).clamp(0, 1)


def augment_views(x: torch.Tensor, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """n augmented copies of the batch x as one [n*B, C, H, W] tensor (module doc); parameters from the global
    CPU generator, noise from x's device's (`gen`, on x's device, for the noise only when given)."""
    return apply_views(x, draw_view_params(n, x.shape[-2], x.shape[-1]), generator=gen)


def views_forward(model_fn, model: torch.nn.Module, views: torch.Tensor, n: int, mode: str = "viewwise"):
    """model_fn(views) with each view's BN statistics its own: one pass (viewwise), n passes (sequential), or
    the pooled statistics of one plain pass (pooled; not the reference, for comparison only)."""
    if mode == "viewwise":
        with viewwise_bn(model, n):
            return model_fn(views)
    if mode == "sequential":
        return torch.cat([model_fn(chunk) for chunk in views.chunk(n)])
    if mode == "pooled":
        return model_fn(views)
    raise ConfigError(f"view_pass must be one of {', '.join(VIEW_PASSES)}, got {mode!r}")


@torch.no_grad()
def teacher_pseudo_labels(strategy, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on x; averaged over `n_aug` augmented views when the frozen source model's mean
    confidence is below the threshold `ap` (CoTTA's augmentation-averaged pseudo-labels; PSMT reuses them).
    `strategy` has `anchor`, `backbone`, `_teacher`, `ap`, `n_aug`, `view_pass` and `count_passes`."""
    strategy.anchor[0].to(x.device)
    confidence = strategy.anchor[0](x).softmax(1).max(1).values.mean()
    teacher = strategy._teacher(x)
    strategy.count_passes(2)
    if confidence < strategy.ap:
        views = augment_views(x, strategy.n_aug)
        out = views_forward(strategy._teacher, strategy.backbone, views, strategy.n_aug, strategy.view_pass)
        teacher = out.view(strategy.n_aug, x.shape[0], -1).mean(0)
        strategy.count_passes(strategy.n_aug)
    return teacher


class CoTTA(TTAStrategy):
    name = "cotta"

    def __init__(self, optim: str = "adam", lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 ema: float = 0.999, restore_prob: float = 0.01, ap: float = 0.92, n_aug: int = 32,
                 loss: str = "ce", view_pass: str = "viewwise", **kw):
        super().__init__(optim=optim, lr=lr, momentum=momentum, nesterov=nesterov, ema=ema,
                         restore_prob=restore_prob, ap=ap, n_aug=n_aug, loss=loss, view_pass=view_pass, **kw)
        self.optim, self.lr, self.momentum, self.nesterov = optim, float(lr), float(momentum), bool(nesterov)
        self.ema, self.restore_prob, self.ap, self.n_aug, self.loss_kind = (
            float(ema), float(restore_prob), float(ap), int(n_aug), loss)
        if view_pass not in VIEW_PASSES:
            raise ConfigError(f"cotta: strategy.view_pass must be one of {', '.join(VIEW_PASSES)}, got {view_pass!r}")
        self.view_pass = view_pass

    def configure(self) -> None:
        use_batch_stats(self.backbone)
        self.backbone.requires_grad_(True)
        params = dict(self.backbone.named_parameters())
        self.anchor = [copy.deepcopy(self.backbone).requires_grad_(False)]  # a list: not a submodule, not state
        self.teacher = MeanTeacher(params, decay=self.ema, restore_prob=self.restore_prob)
        self.optimizer = self.make_optimizer(list(params.values()), self.optim, self.lr, self.momentum,
                                             nesterov=self.nesterov)

    def kept_modules(self):
        return self.anchor

    def _teacher(self, x):
        return functional_call(self.backbone, self.teacher.offline, (x,))

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        teacher = teacher_pseudo_labels(self, x)
        with torch.enable_grad():
            student = self.backbone(x)
            self.count_passes(1)
            loss = soft_ce(student, teacher)
            if self.loss_kind == "sce":  # ImageNet code: 0.5/0.5 in both directions
                loss = 0.5 * loss + 0.5 * soft_ce(teacher, student)
            self.optimizer.zero_grad(set_to_none=True)
            loss.mean().backward()
            self.optimizer.step()
        self.teacher.step()  # EMA of the student, then stochastic restore of the student toward the source
        self.last_loss = loss.detach().mean()
        return teacher

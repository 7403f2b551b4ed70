"""CoTTA (Wang et al., CVPR 2022), qinenergy/cotta `cifar/cotta.py`.

    configure: BN on batch statistics, every weight/bias trainable; student f_θ, teacher f_θ' (EMA), anchor f_θ0
    per batch x:
      s  = f_θ(x)
      c  = mean_batch max softmax f_θ0(x)                       (one batch-level scalar)
      t  = mean_n f_θ'(aug_n(x)) if c < p_th else f_θ'(x)        (n_aug = 32 views)
      L  = mean CE(softmax(t) -> s)  (symmetric CE on ImageNet: loss: sce);  one optimizer step
      θ' <- α θ' + (1-α) θ;   θ <- m θ0 + (1-m) θ, m ~ Bernoulli(p) per element   (cl.ema.MeanTeacher.step)
      return t                                                   (the teacher's prediction, made before the step)
Differences from the reference, on purpose: the views are made on the device in one batched tensor and the
teacher sees all of them in ONE forward pass, so batch-norm statistics are pooled over the views (the reference
runs 32 passes of one view each); each view draws one parameter set for the whole batch, as the reference does.
The augmentation chain omits the Gaussian blur and hue jitter of the KATANA chain (test-sized images).
The 32 views run only when c < p_th (the ImageNet code and mariodoebler; the CIFAR code computes them always).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call

from cl.ema import MeanTeacher
from strategies.tta_base import TTAStrategy, soft_ce, use_batch_stats


def augment_views(x: torch.Tensor, n: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """n augmented copies of the batch x as one [n*B, C, H, W] tensor, built on x's device in one go.

    Per view: brightness 0.6-1.4, contrast 0.7-1.3, saturation 0.5-1.5, gamma 0.7-1.3, affine (±15°, translate
    1/16, scale 0.9-1.1, edge padding), horizontal flip p 0.5, Gaussian noise σ 0.005, clip to [0, 1]."""
    b = x.shape[0]
    dev = x.device

    def u(lo, hi):
        return (torch.rand(n, 1, 1, 1, 1, generator=gen, device=dev) * (hi - lo) + lo)

    v = x.unsqueeze(0).expand(n, *x.shape)
    v = (v * u(0.6, 1.4)).clamp(0, 1)
    mean = v.mean(dim=(2, 3, 4), keepdim=True)
    v = ((v - mean) * u(0.7, 1.3) + mean).clamp(0, 1)
    gray = v.mean(dim=2, keepdim=True)
    v = ((v - gray) * u(0.5, 1.5) + gray).clamp(0, 1)
    v = v.clamp_min(1e-8) ** u(0.7, 1.3)
    ang = (torch.rand(n, generator=gen, device=dev) * 30 - 15) * math.pi / 180
    scale = torch.rand(n, generator=gen, device=dev) * 0.2 + 0.9
    trans = (torch.rand(n, 2, generator=gen, device=dev) * 2 - 1) * (2 / 16)
    flip = torch.where(torch.rand(n, generator=gen, device=dev) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, trans[:, 0]], 1),
                         torch.stack([sin * flip, cos, trans[:, 1]], 1)], 1)  # [n, 2, 3]
    theta = theta.repeat_interleave(b, 0)
    flat = v.reshape(n * b, *x.shape[1:])
    grid = F.affine_grid(theta, flat.shape, align_corners=False)
    flat = F.grid_sample(flat, grid, padding_mode="border", align_corners=False)
    flat = flat + torch.randn(flat.shape, generator=gen, device=dev) * 0.005
    return flat.clamp(0, 1)


@torch.no_grad()
def teacher_pseudo_labels(strategy, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits on x; averaged over `n_aug` augmented views when the frozen source model's mean
    confidence is below the threshold `ap` (CoTTA's augmentation-averaged pseudo-labels; PSMT reuses them).
    `strategy` has `anchor`, `_teacher`, `ap`, `n_aug` and `count_passes`."""
    strategy.anchor[0].to(x.device)
    confidence = strategy.anchor[0](x).softmax(1).max(1).values.mean()
    teacher = strategy._teacher(x)
    strategy.count_passes(2)
    if confidence < strategy.ap:
        views = augment_views(x, strategy.n_aug)
        teacher = strategy._teacher(views).view(strategy.n_aug, x.shape[0], -1).mean(0)
        strategy.count_passes(strategy.n_aug)
    return teacher


class CoTTA(TTAStrategy):
    name = "cotta"

    def __init__(self, optim: str = "adam", lr: float = 1e-3, momentum: float = 0.9, nesterov: bool = False,
                 ema: float = 0.999, restore_prob: float = 0.01, ap: float = 0.92, n_aug: int = 32,
                 loss: str = "ce", **kw):
        super().__init__(optim=optim, lr=lr, momentum=momentum, nesterov=nesterov, ema=ema,
                         restore_prob=restore_prob, ap=ap, n_aug=n_aug, loss=loss, **kw)
        self.optim, self.lr, self.momentum, self.nesterov = optim, float(lr), float(momentum), bool(nesterov)
        self.ema, self.restore_prob, self.ap, self.n_aug, self.loss_kind = (
            float(ema), float(restore_prob), float(ap), int(n_aug), loss)

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
        return teacher

"""TENT (Wang et al., ICLR 2021), DequanWang/tent `tent.py`.

    BN uses test-batch statistics; only BN affine (gamma, beta) train.
    per batch x:  logits = f(x);  L = mean entropy(softmax(logits));  one optimizer step;  return logits
The returned prediction is the one computed before the step (as in the reference `forward_and_adapt`); with
`steps` > 1 it is the last step's, computed before the last update (`Tent.forward`, tent.py:26-33).
Continual by default (reset once); `scenario.reset_each_shift=true` gives the official per-domain reset.
Optimiser (`setup_optimizer`, tent/cifar10c.py:93-117; qinenergy/cotta imagenet/imagenetc.py:101-123): Adam
(beta 0.9, 0.999) on CIFAR; SGD momentum 0.9, dampening 0, NESTEROV on ImageNet (`nesterov: true`, set by
configs/experiment/tent_imagenetc.yaml). BN is made to use batch statistics as `configure_model` (tent.py:96-110);
only BN affine trains (`collect_params`, tent.py:64-80).
"""
from __future__ import annotations

import torch

from strategies.tta_base import TTAStrategy, bn_affine, softmax_entropy, use_batch_stats


class Tent(TTAStrategy):
    name = "tent"

    def __init__(self, optim: str = "adam", lr: float = 1e-3, momentum: float = 0.9, steps: int = 1,
                 nesterov: bool = False, **kw):
        super().__init__(optim=optim, lr=lr, momentum=momentum, steps=steps, nesterov=nesterov, **kw)
        self.optim, self.lr, self.momentum, self.steps = optim, float(lr), float(momentum), int(steps)
        self.nesterov = bool(nesterov)

    def configure(self) -> None:
        self.backbone.requires_grad_(False)
        use_batch_stats(self.backbone)
        params = bn_affine(self.backbone)
        for p in params:
            p.requires_grad_(True)
        self.optimizer = self.make_optimizer(params, self.optim, self.lr, self.momentum, nesterov=self.nesterov)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            for step in range(self.steps):
                logits = self.backbone(x)
                self.count_passes(1)
                prediction = logits.detach()  # Tent.forward returns the LAST step's outputs (tent.py:30-33)
                loss = softmax_entropy(logits).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return prediction

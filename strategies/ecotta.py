"""EcoTTA (Song, Lee, Kweon & Choi, CVPR 2023): memory-efficient continual TTA with meta networks beside a
frozen source network. There is no official full code (patented); the authors' Colab sample, preserved as
Lily-Le/EcoTTA `ecotta_sample_code.py`, fixes the architecture; the paper fixes the losses and settings.

    split the source encoder into K parts f_k of consecutive residual blocks (`num_parts`; WRN-40 K=5
        [3,3,3,3,6], K=4 [3,3,6,6] from the sample code; WRN-28 [2,2,2,2,4] / [2,2,4,4] and ResNet-50
        [2,2,4,4,4] / [3,3,5,5] from Lily-Le's ports, which cite the paper's Table 13); stem and head (final BN,
        pool, classifier) stay frozen outside the parts
    meta network per part: x̃_k = meta_bn(f_k(x̃_{k-1})) + conv_block(x̃_{k-1})
        conv_block = ONE 3x3 conv (stride = the part's downsampling, channels in -> out of the part), BN, ReLU
    original network frozen (no weight trains); its BNs normalise with the BATCH's statistics (`frozen_bn: batch`,
        the default) or with the source running statistics (`frozen_bn: source`); only meta networks train
    warm-up (once, before deployment, on the declared SOURCE data):  CE, SGD lr 0.05 momentum 0.9, no weight
        decay, `warmup_epochs` (10): lr rises linearly from 0 over the first epoch (per iteration), then x0.2 at
        epochs 3, 6, 8 (Lily-Le/EcoTTA main.py:281-285, 309-311, 164-165; utils.py:41-56 WarmUpLR)
    per test batch x:
        logits = head(x̃_K);  prediction = logits                      (made before the update)
        L_ent = mean over {H(ŷ) < E0 = 0.4 ln C} of H(ŷ)                (confident samples only, EATA-style)
        R     = Σ_k mean |x̃_k − sg(f_k(x̃_{k-1}))|                       (self-distilled regularisation, L1)
        one SGD step (lr 5e-3, momentum 0.9) on L_ent + λ R,  λ = 0.5   (the paper's λ; community code 0.25)

Why it saves memory: a frozen conv does not keep its input for a weight gradient, so the original network
stores far less for backward than CoTTA's fully trained student (counted in `adapt_costs`, docs/tta.md). PyTorch
does not exploit this by itself, so the original's convs and BNs run as ops that keep no activation (a conv that
keeps only its weight; with `frozen_bn: source` a BN as its affine map), and every ReLU in the EcoTTA network keeps a 1-bit mask (TinyTL's
accounting, which the paper's memory figures use) instead of its float output; the L1 regulariser keeps its sign
as bits. Measured on WRN-28 (depth 28, K=5, `frozen_bn: source`): 0.37x CoTTA's saved bytes per step, K=4 0.32x
(tests/test_tta_robustbench.py); the same ReLU masks do not shrink CoTTA (its ReLU outputs are the next conv's
saved inputs).

The frozen original's BN statistics (`frozen_bn`). The paper's text could not be read on the machine this was
written on (only its abstract and Fig. 3's caption: "only the meta networks are updated ... while the original
networks are frozen", which is about weights, not statistics), so the choice is not taken from the paper. The
default is `batch`, what the only runnable code does: Lily-Le/EcoTTA puts the WHOLE network in train mode for the
warm-up (main.py:111, 307) and for adaptation (main.py:332), so every frozen BN (stem, parts, head) normalises
with the current batch's statistics; that code reproduces the paper's CIFAR-100-C WRN-40 figure (36.48 vs 36.4,
README and its issue #5). `frozen_bn: source` keeps the source running statistics (clbench's earlier behaviour).
Cost of `batch`: a BN that normalises with batch statistics needs its input for backward even when its affine
is frozen, so the original keeps one activation per BN for backward (the paper's TinyTL-style memory accounting
does not count it); `source` keeps none (its BNs are affine maps).

Deliberate differences (docs/tta.md):
- one optimizer step on the summed loss, as the paper's objective (`update: joint`); `update: two_step` runs the
  community code's two steps (the regulariser with each part's input detached, then the entropy on a fresh pass,
  whose output is the prediction; main.py:59-88);
- R is computed on the same forward pass (targets detached, inputs not detached), so no second pass;
- warm-up augmentation is batched on the device (brightness/contrast jitter p 0.4, 3x3 blur p 0.2, grayscale
  p 0.1, the community recipe's three operations); the decay epochs scale with `warmup_epochs` (x0.2 at
  30/60/80 % of them: 3, 6, 8 for the community's 10; its ImageNet script uses a cosine instead).
- a model without a K table (the synthetic-c ResNet, one block per stage) gets one part per stage; a model
  without a stem/blocks/head split is a ConfigError.
"""
from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cl.engine.errors import ConfigError
from strategies.tta_base import TTAStrategy, softmax_entropy, source_batches, use_batch_stats


def _frozen_bn_forward(self, x):
    """A frozen BN in eval mode as the affine map it is: backward then needs only the per-channel scale, not
    the input (F.batch_norm keeps its input for backward even when nothing in it trains)."""
    scale = self.weight / torch.sqrt(self.running_var + self.eps)
    shift = self.bias - self.running_mean * scale
    return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class _FrozenConv(torch.autograd.Function):
    """Convolution with a frozen weight that keeps only the weight for backward (the input gradient needs
    nothing else): PyTorch's own conv keeps its input even when the weight needs no gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.args = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        gx = torch.nn.grad.conv2d_input(ctx.shape, weight, grad, *ctx.args)
        return gx, None, None, None, None, None, None


def _frozen_conv_forward(self, x):
    return _FrozenConv.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


_BITS = 2 ** torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8 bytes, 8 elements per byte."""
    flat = F.pad(mask.flatten().to(torch.uint8), (0, (-mask.numel()) % 8)).view(-1, 8)
    return (flat * _BITS.to(mask.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    return (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).flatten()[:n].view(shape)


class _PackedReLU(torch.autograd.Function):
    """ReLU whose backward keeps a bit-packed mask (1 bit per element, TinyTL's accounting, which the EcoTTA
    paper uses) instead of the float output PyTorch's ReLU keeps: its input gradient needs only where x > 0."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(pack_bits(x > 0))
        ctx.shape = x.shape
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.shape)


class _PackedL1(torch.autograd.Function):
    """mean |a - b| with b a constant target; backward keeps sign(a - b) as two bit masks, not the difference."""

    @staticmethod
    def forward(ctx, a, b):
        d = a - b
        ctx.save_for_backward(pack_bits(d > 0), pack_bits(d < 0))
        ctx.shape = d.shape
        return d.abs().mean()

    @staticmethod
    def backward(ctx, grad):
        pos, neg = ctx.saved_tensors
        sign = unpack_bits(pos, ctx.shape).to(grad.dtype) - unpack_bits(neg, ctx.shape).to(grad.dtype)
        return grad * sign / sign.numel(), None


class PackedReLUs(torch.overrides.TorchFunctionMode):
    """Inside it, every ReLU (F.relu, nn.ReLU, torch.relu, inplace or not) on a tensor that needs a gradient runs
    as `_PackedReLU`, whatever the architecture's code. An inplace ReLU becomes out of place: models must use the
    returned tensor (RobustBench's and torchvision's do)."""

    RELUS = (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.RELUS and torch.is_grad_enabled() and args[0].requires_grad:
            return _PackedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def _frozen_batch_bn_forward(self, x):
    """A frozen BN normalising with the batch's own statistics (train-mode BN, Lily-Le/EcoTTA main.py:332), its
    running statistics neither used nor updated (they do not change what a train-mode BN outputs)."""
    return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


FROZEN_BN = ("batch", "source")


def freeze_original(model: nn.Module, frozen_bn: str = "source") -> None:
    """The original network: no gradients for its weights, convolutions that keep no activations (the memory
    EcoTTA saves; docs/tta.md); its BNs normalise with the batch's statistics (`batch`) or with the source running
    statistics as affine maps that keep no activation (`source`)."""
    if frozen_bn not in FROZEN_BN:
        raise ConfigError(f"ecotta: strategy.frozen_bn must be one of {', '.join(FROZEN_BN)}, got {frozen_bn!r}")
    model.eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and frozen_bn == "batch":
            m.forward = _frozen_batch_bn_forward.__get__(m)
        elif isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.affine:
            m.forward = _frozen_bn_forward.__get__(m)
        elif type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple):
            m.forward = _frozen_conv_forward.__get__(m)


class MetaPart(nn.Module):
    """One frozen original part with its meta network beside it; returns (x̃_k, x_k = f_k(input))."""

    def __init__(self, original: nn.Module, cin: int, cout: int, stride: int):
        super().__init__()
        self.original = original
        self.meta_bn = nn.BatchNorm2d(cout)
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        xk = self.original(x)
        return self.meta_bn(xk) + F.relu(self.bn(self.conv(x))), xk


def split_blocks(model: nn.Module) -> tuple[list[nn.Module], dict]:
    """The model's residual blocks in order and its K -> blocks-per-part table (cl/models/backbones_robustbench.py)."""
    if not (hasattr(model, "stem") and hasattr(model, "head") and (hasattr(model, "blocks") or hasattr(model, "stages"))):
        raise ConfigError("ecotta needs a source model split into stem, blocks and head (the synthetic-c ResNet or a "
                          f"robustbench backbone); {type(model).__name__} has no such split")
    blocks = list(model.blocks()) if hasattr(model, "blocks") else list(model.stages)
    return blocks, dict(getattr(model, "ecotta_partitions", {}) or {})


def resolve_partition(n_blocks: int, table: dict, num_parts: int | None, partition=None) -> list[int]:
    """Blocks per part: `partition` if given, else the model's K=`num_parts` entry (the paper's Table 13 splits),
    else, for a model without a table (synthetic-c), one part per stage."""
    if partition is None:
        if not table:
            partition = [1] * n_blocks
        elif num_parts in table:
            partition = table[num_parts]
        else:
            raise ConfigError(f"ecotta: this model defines K in {sorted(table)} parts: set strategy.num_parts to one "
                              "of them, or strategy.partition to a list of blocks per part")
    partition = [int(p) for p in partition]
    if sum(partition) != n_blocks or min(partition) < 1:
        raise ConfigError(f"ecotta: strategy.partition {partition} must be positive and sum to the model's "
                          f"{n_blocks} blocks")
    return partition


class EcoTTANet(nn.Module):
    """The frozen source network cut into K parts of consecutive blocks, a meta network beside each part; the
    stem and the head (final BN/pool/classifier) stay frozen and outside the parts, as in the sample code."""

    def __init__(self, backbone: nn.Module, in_shape: tuple[int, ...], num_parts: int | None = 5, partition=None):
        super().__init__()
        model = backbone.model
        blocks, table = split_blocks(model)
        self.partition = resolve_partition(len(blocks), table, num_parts, partition)
        self.stem, self.head_fn = model.stem, model.head
        self.frozen = model  # registered: the original weights are part of the state
        self.normalize = backbone.normalize != "none"
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)
        parts, start = [], 0
        with torch.no_grad():
            h = model.stem(torch.zeros(2, *in_shape))
            for n in self.partition:
                original = nn.Sequential(*blocks[start:start + n])
                start += n
                out = original(h)
                parts.append(MetaPart(original, h.shape[1], out.shape[1], max(1, h.shape[-1] // out.shape[-1])))
                h = out
        self.parts = nn.ModuleList(parts)

    def meta_parameters(self):
        return [p for part in self.parts for m in (part.meta_bn, part.conv, part.bn) for p in m.parameters()]

    def forward(self, x, detach_parts: bool = False):
        """(logits, [(x̃_k, x_k)]); `detach_parts` cuts the graph at each part's input, as the community code's
        regulariser pass (wideresnet28.py `one_part_of_networks`, cal_mseloss: x = x.detach())."""
        if self.normalize:
            x = (x - self.mean) / self.std
        with PackedReLUs():  # ReLUs keep 1-bit masks for backward (the original's and the meta networks')
            h = self.stem(x)
            pairs = []
            for part in self.parts:
                h, xk = part(h.detach() if detach_parts else h)
                pairs.append((h, xk))
            return self.head_fn(h), pairs


def _warmup_augment(x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    b, dev = x.shape[0], x.device

    def pick(p):
        return (torch.rand(b, 1, 1, 1, generator=gen, device=dev) < p).float()

    jitter = pick(0.4)
    bright = torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 0.8 + 0.6
    contrast = torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 0.8 + 0.6
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = jitter * (((x * bright) - mean) * contrast + mean).clamp(0, 1) + (1 - jitter) * x
    blur = pick(0.2)
    x = blur * F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1) + (1 - blur) * x
    gray = pick(0.1)
    return gray * x.mean(1, keepdim=True).expand_as(x) + (1 - gray) * x


class EcoTTA(TTAStrategy):
    name = "ecotta"

    def __init__(self, lr: float = 5e-3, momentum: float = 0.9, reg_weight: float = 0.5, e0_factor: float = 0.4,
                 warmup_epochs: int = 10, warmup_lr: float = 0.05, warmup_batch_size: int = 64, num_parts: int = 5,
                 partition=None, frozen_bn: str = "batch", warmup_weight_decay: float = 0.0,
                 warmup_linear_epochs: int = 1, update: str = "joint", **kw):
        super().__init__(lr=lr, momentum=momentum, reg_weight=reg_weight, e0_factor=e0_factor,
                         warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, warmup_batch_size=warmup_batch_size,
                         num_parts=num_parts, partition=partition, frozen_bn=frozen_bn,
                         warmup_weight_decay=warmup_weight_decay, warmup_linear_epochs=warmup_linear_epochs,
                         update=update, **kw)
        if update not in ("joint", "two_step"):
            raise ConfigError(f"ecotta: strategy.update must be joint or two_step, got {update!r}")
        self.update = update
        if frozen_bn not in FROZEN_BN:
            raise ConfigError(f"ecotta: strategy.frozen_bn must be one of {', '.join(FROZEN_BN)}, got {frozen_bn!r}")
        self.frozen_bn, self.warmup_wd = frozen_bn, float(warmup_weight_decay)
        self.warmup_linear_epochs = int(warmup_linear_epochs)
        self.num_parts, self.partition = int(num_parts), (list(partition) if partition is not None else None)
        self.lr, self.momentum, self.reg_weight, self.e0_factor = float(lr), float(momentum), float(reg_weight), float(e0_factor)
        self.warmup_epochs, self.warmup_lr, self.warmup_bs = int(warmup_epochs), float(warmup_lr), int(warmup_batch_size)
        self.warmup_s = 0.0

    def configure(self) -> None:
        freeze_original(self.backbone, self.frozen_bn)
        size, chans = self.backbone.input_size, self.backbone.in_chans
        self.net = EcoTTANet(self.backbone, (chans, size, size), self.num_parts, self.partition)
        for p in self.net.meta_parameters():
            p.requires_grad_(True)
        self.register_buffer("warmed_up", torch.zeros((), dtype=torch.bool))
        self.optimizer = torch.optim.SGD(self.net.meta_parameters(), lr=self.lr, momentum=self.momentum)

    def begin_experience(self, exp):
        if not bool(self.warmed_up):
            self.warm_up(exp.train)
            self._initial_state = copy.deepcopy(self.state_dict())  # reset target: warmed up
        return super().begin_experience(exp)

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        """A resumed run is past its warm-up: the meta BNs must be in their deployment mode before loading."""
        if bool(state.get("warmed_up", False)) and not bool(self.warmed_up):
            for m in self._meta_modules():
                if isinstance(m, nn.BatchNorm2d):
                    use_batch_stats(m)
        return super().load_state_dict(state, strict=strict, assign=assign)

    def _meta_modules(self):
        return [m for part in self.net.parts for m in (part.meta_bn, part.conv, part.bn)]

    def warm_up(self, source) -> None:
        """The pre-deployment stage: meta networks learn on the declared source data with CE (original frozen)."""
        t0 = time.perf_counter()
        dev = next(self.net.parameters()).device
        params = self.net.meta_parameters()
        opt = torch.optim.SGD(params, lr=self.warmup_lr, momentum=0.9, weight_decay=self.warmup_wd)
        for m in self._meta_modules():
            m.train()
        size, chans = self.backbone.input_size, self.backbone.in_chans
        n_iters = math.ceil(len(source) / self.warmup_bs) if source is not None else 0
        with torch.enable_grad():
            for epoch in range(1, self.warmup_epochs + 1):
                for i, (x, y) in enumerate(source_batches(source, self.warmup_bs, dev, size, chans, seed=epoch - 1)):
                    for g in opt.param_groups:
                        g["lr"] = self.warmup_lr_at(epoch, i, n_iters)
                    logits, _ = self.net(_warmup_augment(x))
                    loss = F.cross_entropy(logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for m in self._meta_modules():  # deployment: meta BNs normalise with the test batch (TENT-like)
            if isinstance(m, nn.BatchNorm2d):
                use_batch_stats(m)
        self.warmed_up.fill_(True)
        self.warmup_s = time.perf_counter() - t0

    def warmup_lr_at(self, epoch: int, i: int, n_iters: int) -> float:
        """The warm-up lr of iteration i (0-based) of epoch `epoch` (1-based), as the community code sets it:
        WarmUpLR over the first `warmup_linear_epochs` epochs, stepped after each batch, so batch k of that span
        runs at base*k/span (the very first at 0; utils.py:41-56, main.py:164-165, 285); after it MultiStepLR
        stepped with the epoch number, base*0.2^(milestones <= epoch) (main.py:283, 310-311)."""
        span = self.warmup_linear_epochs * n_iters
        if epoch <= self.warmup_linear_epochs:
            return self.warmup_lr * ((epoch - 1) * n_iters + i) / (span + 1e-8)
        milestones = [max(1, round(self.warmup_epochs * f)) for f in (0.3, 0.6, 0.8)]
        return self.warmup_lr * 0.2 ** sum(m <= epoch for m in milestones)

    @torch.no_grad()
    def predict(self, x, task_id=None):
        return self.net(x)[0]

    def _entropy_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean entropy over the confident samples, H < E0 = e0_factor * ln C (utils.py:16-27); the others get no
        gradient; 0 (no gradient) when none is confident (the community code's mean of nothing)."""
        ent = softmax_entropy(logits)
        confident = ent < self.e0_factor * math.log(logits.shape[1])
        return (ent * confident).sum() / confident.sum().clamp_min(1)

    def forward_and_adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.update == "two_step":
            return self._two_steps(x)
        with torch.enable_grad():
            logits, pairs = self.net(x)
            self.count_passes(1)
            loss_ent = self._entropy_loss(logits)
            reg = sum(_PackedL1.apply(xt, xk.detach()) for xt, xk in pairs)  # mean |x̃_k - sg(x_k)|
            loss = loss_ent + self.reg_weight * reg
            self.last_loss = {"entropy": loss_ent.detach(), "reg": reg.detach()}
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return logits.detach()

    def _two_steps(self, x: torch.Tensor) -> torch.Tensor:
        """Lily-Le/EcoTTA main.py:59-88: (1) a pass with each part's input detached, one SGD step on λ·Σ_k R_k;
        (2) a fresh pass, one SGD step on the filtered entropy. The prediction is pass (2)'s output: made after
        the regulariser step, before the entropy step (main.py:82, 88)."""
        with torch.enable_grad():
            _, pairs = self.net(x, detach_parts=True)
            reg = sum(_PackedL1.apply(xt, xk.detach()) for xt, xk in pairs)
            self.optimizer.zero_grad(set_to_none=True)
            (self.reg_weight * reg).backward()
            self.optimizer.step()
            logits, _ = self.net(x)
            self.count_passes(2)
            loss_ent = self._entropy_loss(logits)
            self.last_loss = {"entropy": loss_ent.detach(), "reg": reg.detach()}
            self.optimizer.zero_grad(set_to_none=True)
            loss_ent.backward()
            self.optimizer.step()
        return logits.detach()

    def adapt_costs(self) -> dict:
        return {**super().adapt_costs(), "warmup_s": self.warmup_s}

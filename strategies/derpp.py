"""DER++: Dark Experience Replay++ (Buzzega et al., NeurIPS'20), as SparCL's dense baseline runs it.

Algorithm (per mini-batch of the current experience, SparCL's `main_sparse_train_w_data_gradient_efficient.py`
with `--replay_method derpp`, which follows mammoth's `models/derpp.py` and `utils/buffer.py`):

    z = f(aug(x))                                 logits of the current (augmented) batch
    L = CE(z masked to the current classes, y)    `--use_cl_mask` (cl_mask: true)              (:344-354)
    if the buffer is not empty and this is not the first experience:                         (:303)
        (x1, z1) ~ buffer;  L += alpha * MSE(f(aug(x1)), z1)  logits replay          (alpha = 0.1, :367-378)
        (x2, y2) ~ buffer;  L += beta  * CE(f(aug(x2)), y2)   label replay, own draw (beta = 0.5, :380-388)
    backward, SGD step (lr 0.03, no momentum, no weight decay, constant lr, batch 32, 50 epochs per task)
    reservoir-insert (x, y, z) into the buffer (500 items): x NOT augmented, z the logits before the step  (:477)

`aug` is the stream's training transform (seq-cifar10's RandomCrop(32, padding=4) + horizontal flip,
`datasets/seq_cifar10.py:61-66`): the trainer's batch arrives augmented by the dataset, with its un-augmented copy
in `Batch.raw` (`needs_raw_input`); that copy is what the buffer stores (as the reference's `not_aug_inputs`,
ToTensor of the original image), and every draw is augmented again, on the device, with fresh random crops and
flips (`buffer.get_data(..., transform=dataset.get_transform())`, `utils/buffer.py:89-109`). The reference's
Normalize is the backbone's `normalize` (the Split CIFAR-10 / Tiny-ImageNet scenarios set mammoth's mean/std):
normalising inside the model after the crop is the same arithmetic as after ToTensor.

WHY these defaults: they are the script behind SparCL's DER++ numbers
(`scripts/resnet18/run_mag_prune_irr_sp_EM_0.75_gradient0.80.sh`), so that `derpp` and `sparcl` differ only in
the sparsity machinery. Differences from mammoth's own DER++: mammoth replays from the first task on as soon as
the buffer holds something (SparCL waits for the second task: `replay_first_experience: false`), has no
current-class logit mask, and tunes alpha per benchmark (0.1-0.3).

Deliberate differences from the reference code (docs/forgetting_and_sparsity.md has the table):
- The buffer lives on the training device; sample choices, crop offsets and flips are drawn from one CPU generator
  that is part of the resume state (the reference: numpy and torch's global RNGs, augmenting on the CPU through
  PIL); a batch is inserted with one indexed copy instead of one copy per sample (same reservoir rule: a later
  sample of the batch that draws the same slot wins, as in the sequential loop).
- Buffer draws are re-augmented at the dataset's own size and then resized to the backbone's input size when the
  two differ (none of the presets: 32 px CIFAR, 64 px Tiny-ImageNet). Only `crop_flip` and un-augmented streams
  can be re-augmented on the device; other training transforms are refused with an error.
- Evaluation masks classes not seen yet (the framework's class-IL protocol); the reference scores all 10 logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl.engine.data import to_model_input
from cl.engine.errors import ConfigError
from cl.engine.flops import TrainFlopMeter
from cl.engine.strategy import Batch, Strategy

# The layers SparCL sparsifies in its ResNet-18 (profiles/resnet18_cifar/irr/*.yaml): the 16 3x3 convs of
# layer1..layer4; the stem, the 1x1 shortcuts and the classifier stay dense.
PRUNABLE = r"layer[1-4]\.\d+\.conv\d+\.weight$"


def prunable_weights(backbone: nn.Module, pattern: str = PRUNABLE) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of the backbone parameters matching `pattern`, in module order."""
    import re

    rx = re.compile(pattern)
    return [(n, p) for n, p in backbone.named_parameters() if rx.search(n) and p.dim() > 1]


# --- the stream's training transform, re-applied to buffer draws on the device -----------------------------
def crop_flip_params(n: int, pad: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [n, 2] (top, left) in 0..2*pad, flips [n] bool), drawn on the CPU: RandomCrop(size, padding=pad)
    and RandomHorizontalFlip(0.5) per sample."""
    offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    return offsets, flips


def apply_crop_flip(x: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Zero-pad `x` [B, C, H, W] by `pad`, crop H x W at each sample's (top, left), then flip where asked: the
    whole batch in one gather on x's device."""
    b, c, h, w = x.shape
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    offsets = offsets.to(dev)
    rows = offsets[:, :1] + torch.arange(h, device=dev)  # [B, H]
    cols = offsets[:, 1:] + torch.arange(w, device=dev)  # [B, W]
    cols = torch.where(flips.to(dev)[:, None], cols.flip(1), cols)
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class DeviceAugment:
    """The training transform of a stream's datasets (`augment: crop_flip` with its `pad`, or none), applied to a
    float batch on the device with parameters drawn from a CPU generator. `last` keeps the latest parameters."""

    def __init__(self, kind: str = "none", pad: int = 4):
        self.kind, self.pad = kind, int(pad)
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "none":
            self.last = None
            return x
        offsets, flips = crop_flip_params(x.shape[0], self.pad, generator)
        self.last = (offsets, flips)
        return apply_crop_flip(x, self.pad, offsets, flips)

    @classmethod
    def of(cls, dataset) -> "DeviceAugment":
        """The transform `dataset` (a stream's train set, possibly a subset / concatenation / view) applies."""
        found = set()
        _collect_augments(dataset, found)
        augmenting = {a for a in found if a[0] != "none"}
        if not augmenting:
            return cls("none")
        if len(augmenting) > 1:
            raise ConfigError(f"the training data mixes transforms {sorted(augmenting)}: DER++ re-augments its "
                              f"buffer with one; give every dataset the same scenario.augment")
        kind, pad = augmenting.pop()
        if kind != "crop_flip":
            raise ConfigError(f"DER++ / SparCL re-augment buffer draws on the device and support scenario.augment="
                              f"crop_flip or none, not {kind!r}: use scenario.augment=crop_flip (or none)")
        return cls(kind, pad)


def _collect_augments(ds, found: set) -> None:
    parts = getattr(ds, "datasets", None)  # ConcatDataset
    if parts is not None:
        for d in parts:
            _collect_augments(d, found)
        return
    inner = getattr(ds, "dataset", None)  # Subset / TargetSubset / WithExtras
    inner = getattr(ds, "base", None) if inner is None else inner  # SparCL's IndexedView
    if inner is not None:
        _collect_augments(inner, found)
        return
    augment = getattr(ds, "augment", "none") if getattr(ds, "train", True) else "none"
    found.add((str(augment or "none"), int(getattr(ds, "pad", 4))))


class ReservoirBuffer(nn.Module):
    """Reservoir sampling over the whole stream: every example seen has probability size/seen of being stored.

    Stores the input, the label and the logits at insertion. Tensors are module buffers (saved with the strategy);
    `seen` and the generator state are extra state."""

    def __init__(self, size: int, generator: torch.Generator | None = None,
                 x_shape: tuple[int, ...] | None = None, n_logits: int | None = None):
        super().__init__()
        if int(size) < 1:
            raise ConfigError(f"buffer_size must be at least 1, got {size}: DER++ needs a replay buffer")
        self.size, self.seen = int(size), 0
        self.gen = generator if generator is not None else torch.Generator().manual_seed(0)
        self.register_buffer("x", None)
        self.register_buffer("y", None)
        self.register_buffer("logits", None)
        if x_shape is not None and n_logits is not None:
            self._allocate(torch.zeros(1, *x_shape), torch.zeros(1, dtype=torch.long), torch.zeros(1, n_logits))

    def _allocate(self, x, y, logits) -> None:
        self.x = x.new_zeros((self.size, *x.shape[1:]), dtype=torch.float32)
        self.y = y.new_zeros((self.size,), dtype=torch.long)
        self.logits = logits.new_zeros((self.size, *logits.shape[1:]), dtype=torch.float32)

    def __len__(self) -> int:
        return min(self.seen, self.size)

    def slots(self, n: int) -> torch.Tensor:
        """Reservoir slots for the next `n` examples (-1: not stored), drawn on the CPU (no device sync)."""
        pos = torch.arange(self.seen, self.seen + n)
        draw = (torch.rand(n, generator=self.gen, dtype=torch.float64) * (pos + 1).double()).long()
        return torch.where(pos < self.size, pos, torch.where(draw < self.size, draw, torch.full_like(draw, -1)))

    @torch.no_grad()
    def add(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> None:
        if self.x is None:
            self._allocate(x, y, logits)
        if x.shape[1:] != self.x.shape[1:]:
            raise ValueError(f"buffer items are {tuple(self.x.shape[1:])}, got {tuple(x.shape[1:])}: the buffer "
                             "stores the dataset's un-augmented images at the stream's input_shape")
        slots = self.slots(x.shape[0])
        self.seen += x.shape[0]
        # Sequential semantics: when two samples of the batch draw the same slot, the later one stays.
        keep: dict[int, int] = {}
        for i, s in enumerate(slots.tolist()):
            if s >= 0:
                keep[s] = i
        if not keep:
            return
        dst = torch.tensor(list(keep.keys()), device=self.x.device)
        src = torch.tensor(list(keep.values()), device=x.device)
        self.x[dst] = x[src].to(self.x.dtype)
        self.y[dst] = y[src].to(self.y.device)
        self.logits[dst] = logits[src].detach().to(self.logits.dtype)

    def sample_index(self, n: int) -> torch.Tensor:
        """`min(n, len)` distinct stored slots, uniformly, on the CPU (mammoth: np.random.choice, replace=False)."""
        return torch.randperm(len(self), generator=self.gen)[:n]

    def sample(self, n: int):
        idx = self.sample_index(n).to(self.x.device)
        return self.x[idx], self.y[idx], self.logits[idx]

    def get_extra_state(self):
        return {"seen": self.seen, "gen": self.gen.get_state()}

    def set_extra_state(self, state) -> None:
        self.seen = int(state["seen"])
        self.gen.set_state(state["gen"])


def derpp_buffer_loss(model, buf: ReservoirBuffer, batch_size: int, alpha: float = 0.1, beta: float = 0.5,
                      prepare=None):
    """alpha * MSE(f(x1), z1) + beta * CE(f(x2), y2) on two independent buffer draws (SparCL's alpha, beta);
    `prepare(x)` turns a stored (un-augmented) draw into the model's input (augmentation, resize).

    Returns the loss and the number of buffer images forwarded (for FLOP accounting)."""
    prepare = prepare or (lambda x: x)
    x1, _, z1 = buf.sample(batch_size)
    out1 = model(prepare(x1)).float()
    x2, y2, _ = buf.sample(batch_size)
    out2 = model(prepare(x2)).float()
    loss = alpha * F.mse_loss(out1, z1) + beta * F.cross_entropy(out2, y2)
    return loss, x1.shape[0] + x2.shape[0]


class DERpp(Strategy):
    """DER++ with a linear head over all classes on a backbone trained from scratch (module docstring)."""

    name = "derpp"
    supports = ("class_il", "task_il")
    needs_raw_input = True  # the buffer stores the un-augmented input (Batch.raw)

    def __init__(self, buffer_size: int = 500, alpha: float = 0.1, beta: float = 0.5, cl_mask: bool = True,
                 replay_first_experience: bool = False, **hparams):
        super().__init__(buffer_size=buffer_size, alpha=alpha, beta=beta, cl_mask=cl_mask,
                         replay_first_experience=replay_first_experience, **hparams)
        if alpha < 0 or beta < 0:
            raise ConfigError(f"strategy.alpha and strategy.beta must be >= 0, got {alpha}, {beta}")
        self.buffer_size, self.alpha, self.beta = int(buffer_size), float(alpha), float(beta)
        self.cl_mask, self.replay_first_experience = bool(cl_mask), bool(replay_first_experience)

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.head = nn.Linear(backbone.feature_dim, info.n_classes)
        backbone.requires_grad_(True)
        # Seeded from the global RNG, which run_experiment seeds before building: same seed, same draws.
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        # The buffer holds the dataset's un-augmented images at their own size (the stream's input shape).
        shape = tuple(int(v) for v in info.input_shape)
        self.buffer = ReservoirBuffer(self.buffer_size, gen, x_shape=shape, n_logits=info.n_classes)
        self.augment = DeviceAugment("none")  # set from the stream's train set by training_data
        self.flops = TrainFlopMeter()
        self._n_images = 0

    def training_data(self, seen):
        self.augment = DeviceAugment.of(seen[-1].train)
        return super().training_data(seen)

    def buffer_input(self, x: torch.Tensor) -> torch.Tensor:
        """A buffer draw (un-augmented, [0, 1], the dataset's size) -> the model's input: re-augmented with the
        stream's training transform (fresh random parameters from the buffer's generator), then resized."""
        x = self.augment(x, self.buffer.gen)
        return to_model_input(x, self.backbone.input_size, self.backbone.in_chans, x.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def replaying(self) -> bool:
        return len(self.buffer) > 0 and (self.replay_first_experience or int(self.experiences_seen) > 1)

    def current_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cl_mask:  # current-task samples compete only among the current classes (--use_cl_mask)
            z = z.masked_fill(~self.current_mask, float("-inf"))
        return F.cross_entropy(z.float(), y)

    def train_step(self, batch: Batch) -> torch.Tensor:
        if batch.raw is None:
            raise ValueError("DER++ stores the un-augmented input: Batch.raw is missing (the trainer fills it for "
                             "strategies with needs_raw_input; a direct caller passes Batch(x, y, raw=...))")
        z = self.logits(batch.x)
        loss = self.current_loss(z, batch.y)
        n_images = batch.x.shape[0]
        if self.replaying():
            replay, n_buf = derpp_buffer_loss(self.logits, self.buffer, batch.x.shape[0], self.alpha, self.beta,
                                              prepare=self.buffer_input)
            loss = loss + replay
            n_images += n_buf
        self.buffer.add(batch.raw, batch.y, z.detach().float())
        if self.flops.per_image is None:  # once per process: per-image FLOPs of the layers actually run
            self.flops.probe(self, self.logits, batch.x, self.flop_layer_paths())
        self._n_images = n_images  # every image forwarded this step is also backpropagated
        self.after_forward(batch, z)
        return loss

    def after_forward(self, batch: Batch, z: torch.Tensor) -> None:
        """Hook for SparCL's per-example statistics; DER++ records nothing."""

    def flop_layer_paths(self) -> list[str]:
        """Module paths whose FLOPs depend on sparsity (none for dense DER++)."""
        return []

    def before_optimizer_step(self) -> None:
        self.flops.add(self._n_images)

    def run_metrics(self) -> dict:
        """Training FLOPs so far (dense DER++: both equal) and the zero fraction of SparCL's layers."""
        weights = [p.detach() for _, p in prunable_weights(self.backbone)]
        zeros = sum(int((w == 0).sum()) for w in weights)
        total = sum(w.numel() for w in weights)
        return {"train_flops": self.flops.total, "train_flops_dense": self.flops.total_dense,
                "sparsity": zeros / total if total else 0.0}

    def get_extra_state(self):
        return {"flops": self.flops.state()}

    def set_extra_state(self, state) -> None:
        self.flops.load(state["flops"])

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.logits(x)

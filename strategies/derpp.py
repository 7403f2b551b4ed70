"""DER++: Dark Experience Replay++ (Buzzega et al., NeurIPS'20), as SparCL's dense baseline runs it.

Algorithm (per mini-batch of the current experience, SparCL's `main_sparse_train_w_data_gradient_efficient.py`
with `--replay_method derpp`, which follows mammoth's `models/derpp.py` and `utils/buffer.py`):

    z = f(x)                                      logits of the current batch
    L = CE(z masked to the current classes, y)    `--use_cl_mask` (cl_mask: true)
    if the buffer is not empty and this is not the first experience:
        (x1, z1) ~ buffer;  L += alpha * MSE(f(x1), z1)       logits replay          (alpha = 0.1)
        (x2, y2) ~ buffer;  L += beta  * CE(f(x2), y2)        label replay, own draw (beta = 0.5)
    backward, SGD step (lr 0.03, no momentum, no weight decay, constant lr, batch 32, 50 epochs per task)
    reservoir-insert (x, y, z) into the buffer (500 items): the input before augmentation, the logits before the step

WHY these defaults: they are the script behind SparCL's DER++ numbers
(`scripts/resnet18/run_mag_prune_irr_sp_EM_0.75_gradient0.80.sh`), so that `derpp` and `sparcl` differ only in
the sparsity machinery. Differences from mammoth's own DER++: mammoth replays from the first task on as soon as
the buffer holds something (SparCL waits for the second task: `replay_first_experience: false`), has no
current-class logit mask, and tunes alpha per benchmark (0.1-0.3).

Deliberate differences from the reference code:
- No input augmentation inside the strategy: the trainer's batches arrive as the scenario delivers them
  (the reference crops and flips CIFAR batches and buffer draws).
- The buffer lives on the training device and its draws use a CPU generator that is part of the resume state; a
  batch is inserted with one indexed copy instead of one copy per sample (same reservoir rule: a later sample of
  the batch that draws the same slot wins, as in the sequential loop).
- Evaluation masks classes not seen yet (the framework's class-IL protocol); the reference scores all 10 logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl.errors import ConfigError
from cl.flops import TrainFlopMeter
from cl.strategy import Batch, Strategy

# The layers SparCL sparsifies in its ResNet-18 (profiles/resnet18_cifar/irr/*.yaml): the 16 3x3 convs of
# layer1..layer4; the stem, the 1x1 shortcuts and the classifier stay dense.
PRUNABLE = r"layer[1-4]\.\d+\.conv\d+\.weight$"


def prunable_weights(backbone: nn.Module, pattern: str = PRUNABLE) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of the backbone parameters matching `pattern`, in module order."""
    import re

    rx = re.compile(pattern)
    return [(n, p) for n, p in backbone.named_parameters() if rx.search(n) and p.dim() > 1]


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

    def sample(self, n: int):
        """`min(n, len)` distinct stored items, uniformly (mammoth: np.random.choice without replacement)."""
        idx = torch.randperm(len(self), generator=self.gen)[:n].to(self.x.device)
        return self.x[idx], self.y[idx], self.logits[idx]

    def get_extra_state(self):
        return {"seen": self.seen, "gen": self.gen.get_state()}

    def set_extra_state(self, state) -> None:
        self.seen = int(state["seen"])
        self.gen.set_state(state["gen"])


def derpp_buffer_loss(model, buf: ReservoirBuffer, batch_size: int, alpha: float = 0.1, beta: float = 0.5):
    """alpha * MSE(f(x1), z1) + beta * CE(f(x2), y2) on two independent buffer draws (SparCL's alpha, beta).

    Returns the loss and the number of buffer images forwarded (for FLOP accounting)."""
    x1, _, z1 = buf.sample(batch_size)
    x2, y2, _ = buf.sample(batch_size)
    loss = alpha * F.mse_loss(model(x1).float(), z1) + beta * F.cross_entropy(model(x2).float(), y2)
    return loss, x1.shape[0] + x2.shape[0]


class DERpp(Strategy):
    """DER++ with a linear head over all classes on a backbone trained from scratch (module docstring)."""

    name = "derpp"
    supports = ("class_il", "task_il")

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
        shape = (backbone.in_chans, backbone.input_size, backbone.input_size)
        self.buffer = ReservoirBuffer(self.buffer_size, gen, x_shape=shape, n_logits=info.n_classes)
        self.flops = TrainFlopMeter()
        self._n_images = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def replaying(self) -> bool:
        return len(self.buffer) > 0 and (self.replay_first_experience or int(self.experiences_seen) > 1)

    def current_loss(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cl_mask:  # current-task samples compete only among the current classes (--use_cl_mask)
            z = z.masked_fill(~self.current_mask, float("-inf"))
        return F.cross_entropy(z.float(), y)

    def train_step(self, batch: Batch) -> torch.Tensor:
        z = self.logits(batch.x)
        loss = self.current_loss(z, batch.y)
        n_images = batch.x.shape[0]
        if self.replaying():
            replay, n_buf = derpp_buffer_loss(self.logits, self.buffer, batch.x.shape[0], self.alpha, self.beta)
            loss = loss + replay
            n_images += n_buf
        self.buffer.add(batch.x, batch.y, z.detach().float())
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

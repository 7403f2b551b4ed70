"""SEMA: Self-Expansion of pre-trained Models with Mixture of Adapters (Wang et al., CVPR 2025).

Reference code: huiyiwang01/SEMA-CL (`models/sema.py`, `backbone/sema_block.py`, `backbone/sema_components.py`,
`backbone/vit_sema.py`). Algorithm (ptm_cil.md 3.5):

    modules: every block gets a functional adapter parallel to its MLP (AdaptFormer position: fed the
        post-attention residual stream, added to the MLP output): down(D -> 16), ReLU, up(16 -> D), LoRA-style
        init (up = 0); the reference defines a 0.1 scale and dropout but its forward uses neither, so scale 1 and
        no dropout. Blocks `adapt_start_layer..adapt_end_layer` (reference 9..11 of 12) are expandable: there
        each adapter also has a representation descriptor (RD), an autoencoder Linear(D -> rd_dim) ->
        Linear(rd_dim -> D) (no activation) on the token mean of the adapter's input, scored by per-sample MSE,
        with a rolling buffer of its last `buffer_size` training losses (mean, std); a router Linear(D -> n) on
        the token mean mixes the adapters' outputs by softmax. Head: one Linear(D, n_classes).
    task 0: train all functional adapters, routers and the head by CE for `func_epoch` (SGD), then the RDs on
        reconstruction for `rd_epoch`; freeze everything.
    task t > 0: expansion check: in eval mode, batches of `detect_batch_size` training images; at each expandable
        block (in order) z = |loss - mu| / sigma per sample and per existing adapter (its RD's buffer); the
        first block with min over adapters of mean_batch(z) > `exp_threshold` that has not expanded in this task
        gets a new adapter + RD + router column, which are trained (adapter, new router column and head by CE
        over the task's classes for `func_epoch`, then the new RD for `rd_epoch`) and frozen; detection goes on
        with the next batch, and passes repeat until a whole pass adds nothing. So each block expands at most
        once per task. If nothing expanded, only the head is trained for `func_epoch`.
    inference: one forward through the mixture, argmax over the seen classes. Old classes' logits are -inf while
        a later task trains.

Both training phases are SGD (momentum 0.9, weight decay 5e-4, cosine), functional at `func_lr` 0.005, RD at
`rd_lr` 0.01, over the trainer's loader (batch 32). The two phases do not fit the trainer's one SGD loop, so SEMA
sets `uses_sgd = False` and runs each through the trainer's optimisation routine (`self.optimiser`,
cl/engine/phases.py), which also owns autocast, the loss checks, the progress bar and the stop checks. Per phase SEMA
sets the lr, the epochs (`func_epoch`, `rd_epoch`), the weight decay and optionally `limit_train_batches`
(null: the trainer's); momentum, `min_lr` and precision are the trainer's. `configs/strategy/sema.yaml` defaults
`func_epoch`, `func_lr` and `weight_decay` to null, the trainer's (`trainer_cfg`), so `trainer.epochs=...` applies to the functional
phase (the RD phase keeps `rd_epoch`, `rd_lr`).
`adapt_start_layer`/`adapt_end_layer` may count from the end (-3..-1 = the reference's 9..11 of 12 blocks).

Deliberate differences from the reference:
- The router is one Linear(D, 1) column per adapter; the reference concatenates its old router with the new
  column after training (`fix_router`): the same function and the same frozen/trained split.
- RD losses enter the rolling buffer only while that RD trains (the RD phase). The reference also appends the
  untrained RD's losses during the functional phase, but its buffer keeps the last 500 values, and the RD phase
  adds rd_epoch x n_train >= 500 of them in every reference config, so the final statistics are the same; here
  they stay so also on tiny test streams. The reference drops the overflow of the batch that fills the buffer
  (once); here the buffer always keeps the newest `buffer_size` values.
- RD losses and z-scores are computed in float32 with autocast off (the functional path follows the trainer's
  precision); the reference runs in float32 throughout.
- The detection pass uses the stream's training set (training transform, as the reference's `train_loader`
  dataset), shuffled by a generator seeded from the global RNG, so a resumed run replays it.
- Costs: for t > 0 the trainer counts the parameters `begin_experience` returns (the head) before the
  expansion check; what an expansion adds and trains is in `added_params`, and each experience's trained
  parameter count, the adapters per block and the expansion log are in `describe()` (result `strategy_info`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl.models import peft
from cl.engine.data import make_loader, to_model_input
from cl.engine.errors import ConfigError
from cl.engine.strategy import Strategy


class RepresentationDescriptor(nn.Module):
    """SEMA's RD: an autoencoder Linear(dim -> rd_dim) -> Linear(rd_dim -> dim), no activation, both layers
    Kaiming-uniform (a = sqrt(5)) with zero biases; `loss(x)` is the per-sample MSE of the reconstruction."""

    def __init__(self, dim: int, rd_dim: int):
        super().__init__()
        self.encoder = nn.Linear(dim, rd_dim)
        self.decoder = nn.Linear(rd_dim, dim)
        with torch.no_grad():
            for lin in (self.encoder, self.decoder):
                nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5))
                nn.init.zeros_(lin.bias)

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return (self.decoder(self.encoder(x)) - x).pow(2).mean(-1)


class _StopForward(Exception):
    """Raised by the last block an RD-training forward needs: the rest of the ViT is not computed."""


class SemaSlot(peft.PeftModule):
    """The `mlp_adapter` slot of one expandable block: its adapters, their RDs and the router columns.

    forward(x) (x: [B, N, D], the post-attention residual stream) returns sum_i softmax(router(mean_N x))_i *
    adapter_i(x); with one adapter that is adapter_0(x) exactly. Side outputs, set by the strategy:
    - `detecting`: `last_z` [n, B] = |RD loss - buffer mean| / buffer std per adapter (0 while a buffer holds
      <= 2 values, as the reference);
    - `training_rd`: `rd_loss` = mean RD loss of the newest adapter (with grad), its per-sample losses appended
      to its buffer; `stop` then ends the forward after this block.
    """

    def __init__(self, dim: int, bottleneck: int, rd_dim: int, buffer_size: int):
        super().__init__()
        self.dim, self.bottleneck, self.rd_dim, self.buffer_size = int(dim), int(bottleneck), int(rd_dim), int(
            buffer_size)
        self.adapters = nn.ModuleList()
        self.rds = nn.ModuleList()
        self.router = nn.ModuleList()
        self.register_buffer("records", torch.zeros(0, self.buffer_size))
        self.register_buffer("record_len", torch.zeros(0, dtype=torch.long))
        self.detecting = False
        self.training_rd = False
        self.stop = False
        self.last_z: torch.Tensor | None = None
        self.rd_loss: torch.Tensor | None = None
        self.add_adapter()

    @property
    def n_adapters(self) -> int:
        return len(self.adapters)

    def add_adapter(self) -> None:
        device = self.records.device
        self.adapters.append(peft.Adapter(self.dim, bottleneck=self.bottleneck, scale=1.0, dropout=0.0,
                                          act="relu").to(device).train(self.training))
        self.rds.append(RepresentationDescriptor(self.dim, self.rd_dim).to(device).train(self.training))
        self.router.append(nn.Linear(self.dim, 1).to(device).train(self.training))  # nn.Linear's default init
        self.records = torch.cat([self.records, self.records.new_zeros(1, self.buffer_size)])
        self.record_len = torch.cat([self.record_len, self.record_len.new_zeros(1)])

    # --- the rolling loss buffers -----------------------------------------------------------------
    @torch.no_grad()
    def record(self, i: int, losses: torch.Tensor) -> None:
        """Appends losses to adapter i's buffer, keeping the newest `buffer_size` (oldest first)."""
        n = int(self.record_len[i])
        kept = torch.cat([self.records[i, :n], losses.detach().float().flatten()])[-self.buffer_size:]
        self.records[i, : len(kept)] = kept
        self.record_len[i] = len(kept)

    def stats(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, unbiased std) of adapter i's buffer, as the reference's `Records`."""
        r = self.records[i, : int(self.record_len[i])]
        return r.mean(), r.var().sqrt()

    @torch.no_grad()
    def z_scores(self, xm: torch.Tensor) -> torch.Tensor:
        out = []
        for i, rd in enumerate(self.rds):
            loss = rd.loss(xm)
            if int(self.record_len[i]) > 2:
                mean, std = self.stats(i)
                out.append((loss - mean).abs() / std)
            else:
                out.append(torch.zeros_like(loss))
        return torch.stack(out)

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.detecting or self.training_rd:
            with torch.autocast(x.device.type, enabled=False):
                xm = x.detach().float().mean(1)
                if self.detecting:
                    self.last_z = self.z_scores(xm)
                if self.training_rd:
                    with torch.enable_grad():  # the strategy runs the frozen ViT under no_grad
                        losses = self.rds[-1].loss(xm)
                        self.rd_loss = losses.mean()
                    self.record(len(self.rds) - 1, losses)
                    if self.stop:
                        raise _StopForward
        # With one adapter the softmax weight is exactly 1; the router still runs, as in the reference, so that
        # its column gets its (zero) gradient and the optimiser's weight decay at task 0.
        xm = x.mean(1)
        weights = torch.softmax(torch.cat([r(xm) for r in self.router], dim=1), dim=1)  # [B, n]
        out = self.adapters[0](x) * weights[:, 0, None, None]
        for i in range(1, len(self.adapters)):
            out = out + self.adapters[i](x) * weights[:, i, None, None]
        return out

    def extra_repr(self) -> str:
        return f"adapters={len(self.adapters)}, rd_dim={self.rd_dim}, buffer_size={self.buffer_size}"


class SEMA(Strategy):
    name = "sema"
    supports = ("class_il", "task_il")
    uses_sgd = False
    stored_buffers = ()  # its buffers are bookkeeping (expansion log, trained counts), not stored data

    def __init__(self, ffn_num: int = 16, rd_dim: int = 128, buffer_size: int = 500, detect_batch_size: int = 128,
                 exp_threshold: float = 2.0, adapt_start_layer: int = 9, adapt_end_layer: int = 11,
                 func_epoch: int | None = None, rd_epoch: int = 20, func_lr: float | None = None, rd_lr: float = 0.01,
                 weight_decay: float | None = None, limit_train_batches: int | None = None, **hparams):
        super().__init__(ffn_num=ffn_num, rd_dim=rd_dim, buffer_size=buffer_size,
                         detect_batch_size=detect_batch_size, exp_threshold=exp_threshold,
                         adapt_start_layer=adapt_start_layer, adapt_end_layer=adapt_end_layer, func_epoch=func_epoch,
                         rd_epoch=rd_epoch, func_lr=func_lr, rd_lr=rd_lr, weight_decay=weight_decay,
                         limit_train_batches=limit_train_batches, **hparams)
        for key in ("func_epoch", "rd_epoch"):
            if self.hparams[key] is not None and int(self.hparams[key]) < 0:
                raise ConfigError(f"sema.{key} must be >= 0, got {self.hparams[key]}")
        if limit_train_batches is not None and int(limit_train_batches) < 1:
            raise ConfigError(f"sema.limit_train_batches must be at least 1 or null, got {limit_train_batches}")
        self.h = self.hparams
        self._growth: dict = {"adapters_per_block": [], "expandable_blocks": [], "expansions": [],
                              "trained_params_per_experience": []}

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        # null: the trainer's value (handed over as trainer_cfg; recorded here so strategy_info shows what ran)
        for key, field in (("func_epoch", "epochs"), ("func_lr", "lr"), ("weight_decay", "weight_decay")):
            if self.h[key] is None:
                self.h[key] = getattr(self.trainer_cfg, field)
        backbone.requires_grad_(False)
        vit = backbone.model
        blocks = peft.wrap_blocks(vit)
        depth = len(blocks)
        given = int(self.h["adapt_start_layer"]), int(self.h["adapt_end_layer"])
        start, end = (i + depth if i < 0 else i for i in given)
        if not 0 <= start <= end < depth:
            raise ConfigError(f"sema: adapt_start_layer..adapt_end_layer = {given[0]}..{given[1]} must name blocks "
                              f"0..{depth - 1} (negative: from the end) of this {depth}-block ViT, start <= end "
                              "(reference: 9..11 of 12, i.e. -3..-1)")
        dim = int(getattr(vit, "embed_dim", backbone.feature_dim))
        self.expandable = list(range(start, end + 1))
        self.slots: list[SemaSlot] = []  # plain lists: the modules are registered in their blocks' slots
        for i, blk in enumerate(blocks):
            if i in self.expandable:
                module = SemaSlot(dim, self.h["ffn_num"], self.h["rd_dim"], self.h["buffer_size"])
                self.slots.append(module)
            else:
                module = peft.Adapter(dim, bottleneck=self.h["ffn_num"], scale=1.0, dropout=0.0, act="relu")
            blk.mlp_adapter = module.train(vit.training)
            blk.mlp_adapter_position = "parallel"
        self.blocks = blocks
        self.head = nn.Linear(backbone.feature_dim, info.n_classes)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.head.weight, a=math.sqrt(5))
            nn.init.zeros_(self.head.bias)
        self.register_buffer("expansion_log", torch.zeros(0, 2, dtype=torch.long))  # (experience, block) rows
        self.register_buffer("trained_params", torch.zeros(info.n_experiences, dtype=torch.long))
        self._growth["expandable_blocks"] = list(self.expandable)
        self._sync_growth()

    def adapters_per_block(self) -> list[int]:
        return [blk.mlp_adapter.n_adapters if isinstance(blk.mlp_adapter, SemaSlot) else 1 for blk in self.blocks]

    def _sync_growth(self) -> None:
        """Updates the dict `describe()` hands out in place, so a result written later shows the current state."""
        g = self._growth
        g["adapters_per_block"][:] = self.adapters_per_block()
        g["expansions"][:] = [{"experience": int(e), "block": int(b)} for e, b in self.expansion_log.tolist()]
        g["trained_params_per_experience"][:] = self.trained_params.tolist()

    def trained_param_count(self) -> int:
        """What `fit_experience` trained (an expansion's new adapter, RD and router column, or the head)."""
        return int(self.trained_params[int(self.experiences_seen) - 1])

    def describe(self):
        return {**super().describe(), "growth": self._growth}

    # --- resume ----------------------------------------------------------------------------------
    def load_state_dict(self, state, strict: bool = True):
        for slot, block in zip(self.slots, self.expandable):
            prefix = f"backbone.model.blocks.{block}.mlp_adapter.adapters."
            n = len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})
            while slot.n_adapters < n:
                slot.add_adapter()
        self.expansion_log = torch.zeros_like(state["expansion_log"])
        out = super().load_state_dict(state, strict=strict)
        self.requires_grad_(False)
        self._sync_growth()
        return out

    # --- parameter sets --------------------------------------------------------------------------
    def _first_task_functional(self) -> list[nn.Parameter]:
        params = [p for m in self.functional_modules() for p in m.parameters()]
        params += [p for s in self.slots for p in s.router.parameters()]
        return params + list(self.head.parameters())

    def functional_modules(self) -> list[nn.Module]:
        return [blk.mlp_adapter if not isinstance(blk.mlp_adapter, SemaSlot) else blk.mlp_adapter.adapters[0]
                for blk in self.blocks]

    def begin_experience(self, exp):
        """The parameters this experience trains, as far as known now: at task 0 every adapter, router column,
        RD and the head; later the head (an expansion's modules are created during `fit_experience`)."""
        self.requires_grad_(False)
        if int(self.experiences_seen) == 1:
            params = self._first_task_functional() + [p for s in self.slots for p in s.rds.parameters()]
        else:
            params = list(self.head.parameters())
        for p in params:
            p.requires_grad_(True)
        return [{"params": params}]

    # --- training --------------------------------------------------------------------------------
    def fit_experience(self, exp, loader, device) -> None:
        t = int(self.experiences_seen) - 1
        self._trained: dict[int, int] = {}  # id -> numel of every parameter trained in this experience
        if t == 0:
            self._train_functional(loader, device, self._first_task_functional(), f"exp {t + 1} func")
            rd = [p for s in self.slots for p in s.rds[0].parameters()]
            self._train_rd(loader, device, self.slots, rd, f"exp {t + 1} rd")
        else:
            added = self._detect_and_expand(exp, loader, device, t)
            if added == 0:
                self._train_functional(loader, device, list(self.head.parameters()), f"exp {t + 1} head")
        self.requires_grad_(False)
        self.trained_params[t] = sum(self._trained.values())
        self._sync_growth()
        self.eval()

    def _phase_settings(self) -> dict:
        """Both phases: SGD with the phase's weight decay, cosine over the phase's epochs (models/sema.py:205-225);
        momentum, min_lr and precision are the trainer's; `limit_train_batches` if set, else the trainer's."""
        limit = self.h["limit_train_batches"]
        return {"optimizer": "sgd", "scheduler": "cosine", "weight_decay": self.h["weight_decay"],
                **({"limit_train_batches": int(limit)} if limit is not None else {})}

    def _optimizer(self, params: list[nn.Parameter], lr: float, epochs: int):
        """(SGD, cosine schedule) of one phase, built by the trainer's routine."""
        return self.optimiser(self.head.weight.device).make_optimizer(params, lr=lr, epochs=epochs,
                                                                      **self._phase_settings())

    def _run_phase(self, step, loader, device, params: list[nn.Parameter], lr: float, epochs: int,
                   desc: str) -> None:
        """Unfreezes and records `params`, then `epochs` epochs of `step` over `loader` by the trainer's routine."""
        for p in params:
            p.requires_grad_(True)
            self._trained[id(p)] = p.numel()
        opt, sched = self._optimizer(params, lr, epochs)
        self.train()
        self.optimiser(device).phase(step, loader, opt=opt, sched=sched, epochs=epochs, desc=desc,
                                     **self._phase_settings())

    def _train_functional(self, loader, device, params: list[nn.Parameter], desc: str) -> None:
        """CE over the current task's classes (older logits -inf) for `func_epoch` epochs on `params`."""
        epochs = int(self.h["func_epoch"])
        if epochs == 0 or not params:
            return
        size, chans = self.backbone.input_size, self.backbone.in_chans

        def step(batch):
            x, y = to_model_input(batch[0], size, chans, device), batch[1].to(device)
            logits = self.head(self.backbone(x)).float().masked_fill(~self.current_mask, float("-inf"))
            return F.cross_entropy(logits, y)

        self._run_phase(step, loader, device, params, self.h["func_lr"], epochs, desc)

    def _train_rd(self, loader, device, slots: list[SemaSlot], params: list[nn.Parameter], desc: str) -> None:
        """The newest RD of each slot in `slots` on reconstruction (sum over slots of the mean per-sample MSE)
        for `rd_epoch` epochs; their buffers record the losses. The rest of the model is frozen and runs without
        grad; the forward stops after the last slot involved."""
        epochs = int(self.h["rd_epoch"])
        if epochs == 0 or not params:
            return
        size, chans = self.backbone.input_size, self.backbone.in_chans
        last = max(slots, key=lambda s: self.slots.index(s))

        def step(batch):
            try:
                with torch.no_grad():
                    self.backbone(to_model_input(batch[0], size, chans, device))
            except _StopForward:
                pass
            return sum(s.rd_loss for s in slots)

        for s in slots:
            s.training_rd, s.stop = True, s is last
        try:
            self._run_phase(step, loader, device, params, self.h["rd_lr"], epochs, desc)
        finally:
            for s in slots:
                s.training_rd, s.stop, s.rd_loss = False, False, None

    # --- the expansion check ---------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, x: torch.Tensor, expanded: set[int] | None = None) -> int | None:
        """The first expandable block (in block order) whose min over adapters of the batch-mean z-score exceeds
        `exp_threshold`, skipping blocks in `expanded`; None if there is none. `x` is a model input batch."""
        expanded = expanded or set()
        self.eval()
        for s in self.slots:
            s.detecting = True
        try:
            with self.optimiser(x.device).autocast():
                self.backbone(x)
        finally:
            for s in self.slots:
                s.detecting = False
        for block, s in zip(self.expandable, self.slots):
            z = s.last_z
            s.last_z = None
            if block not in expanded and float(z.mean(1).min()) > self.h["exp_threshold"]:
                return block
        return None

    def expand(self, block: int) -> SemaSlot:
        slot = self.slots[self.expandable.index(block)]
        slot.add_adapter()
        self.expansion_log = torch.cat([self.expansion_log, self.expansion_log.new_tensor(
            [[int(self.experiences_seen) - 1, block]])])
        self._sync_growth()
        return slot

    def _detect_and_expand(self, exp, loader, device, t: int) -> int:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())  # from the global RNG: a resumed run replays it
        detect_loader = make_loader(exp.train, batch_size=int(self.h["detect_batch_size"]), shuffle=True,
                                    seed=seed)
        size, chans = self.backbone.input_size, self.backbone.in_chans
        expanded: set[int] = set()
        while True:
            added = 0
            for x, _ in detect_loader:
                block = self.detect(to_model_input(x, size, chans, device), expanded)
                if block is None:
                    continue
                slot = self.expand(block)
                expanded.add(block)
                added += 1
                self.requires_grad_(False)
                new = list(slot.adapters[-1].parameters()) + list(slot.router[-1].parameters())
                self._train_functional(loader, device, new + list(self.head.parameters()),
                                       f"exp {t + 1} func (block {block})")
                self._train_rd(loader, device, [slot], list(slot.rds[-1].parameters()),
                               f"exp {t + 1} rd (block {block})")
                self.requires_grad_(False)
            if added == 0:
                return len(expanded)

    # --- inference -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        return self.head(self.backbone(x))

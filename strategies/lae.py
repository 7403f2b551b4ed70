"""LAE: Learning-Accumulation-Ensemble, "A Unified Continual Learning Framework with General Parameter-Efficient
Tuning" (Gao et al., ICCV 2023).

Reference code: gqk/LAE (`main.py`, `libml/model/pet/*`, `libml/model/head/dynamic_simple.py`); the defaults are
its `MyModuleConf`, `config/vit_{adapter,lora,prefix}.yaml` and `config/base/*.yaml` (ptm_cil.md 2, 3.4).
Algorithm:

    set-up: freeze the pre-trained ViT; one online PET module per block of `adapt_blocks` (0..4), of type `pet`:
        adapter: Linear(d->5), GELU, Linear(5->d), learnable scalar (init 1), parallel to the attention:
                 attn(norm1 x) + adapter(norm1 x);
        lora:    rank-5 updates of the K and V projections, each with a learnable scalar (init 1);
        prefix:  10 key and 10 value tokens per block, each set with a learnable scalar (init 1), with the
                 compensatory renormalisation of the prefix attention mass;
    experience t:
        1. head: append one biased Linear(d -> |classes of t|) (weights N(0, 0.001), bias 0) on the CLS
           feature; the heads' outputs are concatenated (DynamicSimpleHead);
        2. t == 1: offline PET := EMA copy of the online PET (the task-0 online PET at this point);
        3. learning: Adam on the online PET and the new head, CE on the current task's logits only;
           t >= 1: the online PET is frozen for the first `num_freeze_epochs` epochs (head-only warm-up);
        4. accumulation: after every optimiser step with an offline PET (t >= 1, frozen epochs included):
           theta_off <- ema_decay * theta_off + (1 - ema_decay) * theta_on  (`cl.models.ema.MeanTeacher`);
    inference: p = max(softmax(f_on(x)), softmax(f_off(x))) element-wise over the seen classes, then argmax
        (two backbone passes; the shared heads; the online model alone before the offline PET exists).

The paper's ablation compares the ensemble with its members (online alone, offline alone); so that a result can
show it, `record_members` (default on) scores the online module, the offline module and the ensemble on the seen
test sets (class-IL, sample-weighted, as `last_acc`) at the end of every experience and reports them through
`run_metrics` as `lae_online_acc`, `lae_offline_acc`, `lae_ensemble_acc` (the offline one only once it exists).
Cost: two extra backbone passes over the seen test images per experience; `record_members=false` skips them.
They run in fp32 (the trainer's evaluation autocasts on CUDA, so there `lae_ensemble_acc` may differ from `last_acc`
in the last digits); after a mid-stream resume the earlier test sets are unknown and nothing is reported.

Deliberate differences from the reference (none changes the function computed, except where noted):
- Global class ids: each head's outputs are placed at its classes' global ids (the reference relabels classes
  to arrival order); CE over the current head's outputs is the reference's `output[:, num_old_classes:]`.
- Only the newest head is handed to the optimiser. The reference passes all heads, but the old ones get exactly
  zero gradients from the sliced CE, and a fresh Adam with weight decay 0 never moves them: same trajectory.
  `trainable_params` is therefore online PET + newest head.
- The offline pass runs the same backbone with the EMA tensors substituted (`torch.func.functional_call`)
  instead of attaching a deep-copied module; the EMA is `torch._foreach_lerp_` (timm's `ModelEmaV2` computes
  `ema * decay + (1 - decay) * online` and also averages buffers, which PET modules do not have).
- LoRA: the low-rank update is added to the K/V activations (`cl.models.peft.LoRALinear`) instead of to the fused
  weight (`F.linear(x, W + dW)`): the same function up to rounding.
- `adapt_blocks` indices beyond the backbone's depth are dropped (the test-sized vit-tiny has 4 blocks).
- Not implemented: `num_emas > 1` (a chain of offline PETs) and `eval_only_emas` (reference defaults 1 and
  false).
- Engine-level: the loader keeps the last incomplete batch (the reference uses `drop_last: true`), bf16 autocast on
  CUDA (the reference trains in fp32), and the scenario's transforms (PILOT's RandomResizedCrop(scale 0.05-1),
  bicubic test resize; the reference uses torchvision defaults: scale 0.08-1, bilinear). Class order and weights
  are set by the preset (see configs/experiment/lae_*.yaml).
- The PILOT port (`models/lae.py`) differs from the reference and is NOT followed here: it makes the EMA copy at
  construction and updates it from task 0, freezes the PET in the first epochs of task 0 too, uses one
  SimpleLinear with old logits masked instead of per-task heads, IN-1K weights, and batch 128 with the same lr.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cl.models import peft
from cl.models.ema import MeanTeacher
from cl.engine.errors import ConfigError
from cl.engine.features import extract_features
from cl.engine.model_cache import isolated_rng
from cl.engine.strategy import Batch, Strategy

PET_KINDS = ("adapter", "lora", "prefix")


class KVLoRA(peft.LoRALinear):
    """LAE's KVLoRA: rank-r updates of the K and V slices of a fused qkv linear, each multiplied by its own
    learnable scalar (the reference's `Scaler(None)`, init 1; no alpha/rank factor). With
    `learnable_scale=False` the scale is a constant 1."""

    def __init__(self, base: nn.Linear, rank: int, learnable_scale: bool = True):
        super().__init__(base, rank=rank, alpha=None, targets=("k", "v"))
        del self.scaling  # the float set by LoRALinear; replaced by one scalar per target, shape (T, 1)
        scale = torch.ones(len(self.targets), 1, dtype=base.weight.dtype, device=base.weight.device)
        if learnable_scale:
            self.scaling = nn.Parameter(scale)
        else:
            self.register_buffer("scaling", scale, persistent=False)

    def own_peft_parameters(self) -> list[nn.Parameter]:
        extra = [self.scaling] if isinstance(self.scaling, nn.Parameter) else []
        return [self.lora_A, self.lora_B, *extra]

    def delta_weight(self) -> torch.Tensor:
        per = torch.bmm(self.lora_B, self.lora_A) * self.scaling[:, :, None]
        zeros = per.new_zeros(self.slice, self.in_features)
        return torch.cat([per[self.targets.index(t)] if t in self.targets else zeros for t in peft.QKV], dim=0)


class ScaledPrefix(peft.Prefix):
    """LAE's Prefix: `cl.models.peft.Prefix` (U(0, 0.01) tokens, compensatory) with the reference's learnable scalars
    on the key tokens and on the value tokens (`key_scale: null`, `val_scale: null`, init 1)."""

    def __init__(self, n_tokens: int, dim: int, num_heads: int, compensate: bool = True,
                 learnable_scale: bool = True):
        super().__init__(n_tokens, dim, num_heads, compensate=compensate, init="uniform")
        if learnable_scale:
            self.key_scale = nn.Parameter(torch.ones(()))
            self.value_scale = nn.Parameter(torch.ones(()))
        else:
            self.key_scale = self.value_scale = None

    def key_value(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().key_value(dtype)
        if self.key_scale is not None:
            k, v = k * self.key_scale.to(k.dtype), v * self.value_scale.to(v.dtype)
        return k, v


class LAE(Strategy):
    name = "lae"
    supports = ("class_il", "task_il")
    stored_buffers = ("ema.",)  # the offline PET

    def __init__(self, pet: str = "adapter", adapt_blocks=(0, 1, 2, 3, 4), prefix_length: int = 10,
                 prefix_compensate: bool = True, adapter_bottleneck: int = 5, lora_rank: int = 5,
                 learnable_scale: bool = True, ema_decay: float = 0.9999, num_freeze_epochs: int = 3,
                 head_init_std: float = 0.001, record_members: bool = True, **hparams):
        super().__init__(pet=pet, adapt_blocks=list(adapt_blocks), prefix_length=prefix_length,
                         prefix_compensate=prefix_compensate, adapter_bottleneck=adapter_bottleneck,
                         lora_rank=lora_rank, learnable_scale=learnable_scale, ema_decay=ema_decay,
                         num_freeze_epochs=num_freeze_epochs, head_init_std=head_init_std,
                         record_members=bool(record_members), **hparams)
        if pet not in PET_KINDS:
            raise ConfigError(f"lae.pet must be one of {PET_KINDS}, got {pet!r}")
        if not 0.0 <= float(ema_decay) <= 1.0:
            raise ConfigError(f"lae.ema_decay must be in [0, 1], got {ema_decay}")
        self.h = self.hparams

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        backbone.requires_grad_(False)
        vit = backbone.model
        depth = len(vit.blocks)
        blocks = [int(b) for b in self.h["adapt_blocks"] if 0 <= int(b) < depth]
        if not blocks:
            raise ConfigError(f"lae.adapt_blocks {self.h['adapt_blocks']} names no block of this "
                              f"{depth}-block backbone")
        self.blocks = blocks
        self._add_pet(vit, blocks)
        pet_ids = {id(p) for p in peft.peft_parameters(vit)}
        # The online PET as (name in self.backbone, Parameter): names for the offline pass, references for EMA.
        named = [(n, p) for n, p in backbone.named_parameters() if id(p) in pet_ids]
        self.pet_names = [n for n, _ in named]
        self.pet_params = [p for _, p in named]
        for p in self.pet_params:
            p.requires_grad_(True)
        self.heads = nn.ModuleList()
        self.register_module("ema", None)  # the offline PET, from experience 1 on
        c = info.n_classes
        self.register_buffer("order", torch.full((c,), -1, dtype=torch.long))     # head output j -> class id
        self.register_buffer("cls2task", torch.full((c,), -1, dtype=torch.long))  # class id -> its head
        self.register_buffer("class_pos", torch.zeros(c, dtype=torch.long))       # class id -> output in its head
        self._seen_tests: list = []  # the seen experiences' test sets, for the member accuracies (not saved)
        self._members: dict[str, float] = {}

    def _add_pet(self, vit: nn.Module, blocks: list[int]) -> None:
        kind, learn = self.h["pet"], self.h["learnable_scale"]
        if kind == "adapter":
            peft.add_attn_adapters(vit, blocks, bottleneck=self.h["adapter_bottleneck"], act="gelu", dropout=0.0,
                                   scale=1.0, scale_learnable=learn)
        elif kind == "lora":
            for i in blocks:
                attn = vit.blocks[i].attn
                attn.qkv = KVLoRA(attn.qkv, rank=self.h["lora_rank"], learnable_scale=learn).train(vit.training)
        else:
            for blk in peft.wrap_blocks(vit, blocks):
                attn = blk.attn
                blk.prefix = ScaledPrefix(self.h["prefix_length"], attn.num_heads * attn.head_dim, attn.num_heads,
                                          compensate=self.h["prefix_compensate"],
                                          learnable_scale=learn).train(blk.training)

    def online_pet(self) -> dict[str, nn.Parameter]:
        return dict(zip(self.pet_names, self.pet_params))

    def _new_ema(self) -> MeanTeacher:
        return MeanTeacher(self.online_pet(), decay=self.h["ema_decay"])

    def _new_head(self, n_out: int, init: bool = True) -> nn.Linear:
        device, dtype = self.pet_params[0].device, self.pet_params[0].dtype  # a new head joins the model's dtype
        if not init:  # resume: values come from the checkpoint (and no global RNG draw)
            return torch.nn.utils.skip_init(nn.Linear, self.backbone.feature_dim, n_out, device=device, dtype=dtype)
        head = nn.Linear(self.backbone.feature_dim, n_out, device=device, dtype=dtype)
        with torch.no_grad():
            nn.init.normal_(head.weight, std=self.h["head_init_std"])
            nn.init.zeros_(head.bias)
        return head

    @property
    def n_head_outputs(self) -> int:
        return sum(h.out_features for h in self.heads)

    # --- training --------------------------------------------------------------------------------
    @property
    def task(self) -> int:
        return int(self.experiences_seen) - 1

    def begin_experience(self, exp):
        t = self.task
        classes = torch.as_tensor(list(exp.classes), dtype=torch.long, device=self.order.device)
        start = self.n_head_outputs
        self.order[start:start + len(classes)] = classes
        self.cls2task[classes] = t
        self.class_pos[classes] = torch.arange(len(classes), device=classes.device)
        self.heads.append(self._new_head(len(classes)))
        if t >= 1 and self.ema is None:
            self.ema = self._new_ema()  # a copy of the task-0 online PET
        for head in self.heads[:-1]:
            head.requires_grad_(False)
        self.heads[-1].requires_grad_(True)
        for p in self.pet_params:
            p.requires_grad_(True)
        return [{"params": list(self.pet_params)}, {"params": list(self.heads[-1].parameters())}]

    def begin_epoch(self, epoch: int, n_epochs: int) -> None:
        """t >= 1: the online PET is frozen during epochs 0 .. num_freeze_epochs - 1 (head-only warm-up)."""
        if self.task == 0 or self.h["num_freeze_epochs"] < 1:
            return
        frozen = epoch < self.h["num_freeze_epochs"]
        for p in self.pet_params:
            p.requires_grad_(not frozen)
            if frozen:
                p.grad = None

    def train_step(self, batch: Batch) -> torch.Tensor:
        logits = self.heads[-1](self.backbone(batch.x))
        return F.cross_entropy(logits.float(), self.class_pos[batch.y])

    def after_optimizer_step(self) -> None:
        if self.ema is not None:
            self.ema.update()

    # --- inference -------------------------------------------------------------------------------
    @property
    def forward_passes_per_test_image(self) -> int:  # type: ignore[override]
        return 2 if self.ema is not None else 1

    def probs(self, feats: torch.Tensor) -> torch.Tensor:
        """softmax over the seen classes of the concatenated heads, at global class ids (0 elsewhere)."""
        n = self.n_head_outputs
        logits = torch.cat([h(feats) for h in self.heads], dim=1).float()
        full = logits.new_full((feats.shape[0], self.info.n_classes), float("-inf"))
        full[:, self.order[:n]] = logits
        return full.softmax(dim=1)

    def ensemble(self, p_on: torch.Tensor, p_off: torch.Tensor | None) -> torch.Tensor:
        return p_on if p_off is None else torch.maximum(p_on, p_off)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id: torch.Tensor | None = None) -> torch.Tensor:
        if not self.heads:  # nothing learnt yet (eval_future before the first experience)
            return x.new_zeros(x.shape[0], self.info.n_classes, dtype=torch.float32)
        p_on = self.probs(self.backbone(x))
        p_off = None
        if self.ema is not None:
            p_off = self.probs(torch.func.functional_call(self.backbone, self.ema.offline, (x,)))
        out = self.ensemble(p_on, p_off)
        if task_id is not None:  # task-IL: the reference's task-local accuracy slices the ensembled output
            out = out.masked_fill(self.cls2task[None, :] != task_id[:, None], float("-inf"))
        return out

    # --- the members' accuracies (run_metrics) ----------------------------------------------------------
    @torch.no_grad()
    def end_experience(self, exp, loader) -> None:
        super().end_experience(exp, loader)
        if not self.h["record_members"] or self.info.kind not in ("class_il", "task_il"):
            return
        self._seen_tests.append(exp.test)
        self._members = {}
        if len(self._seen_tests) != int(self.experiences_seen):  # resumed mid-stream: the earlier sets are unknown
            return
        was_training = self.training
        self.eval()
        device, dtype = self.pet_params[0].device, self.pet_params[0].dtype

        def members(x: torch.Tensor) -> torch.Tensor:
            x = x.to(dtype)  # the model's precision (fp64 in the reference-step test)
            p_on = self.probs(self.backbone(x))
            p_off = None if self.ema is None else self.probs(
                torch.func.functional_call(self.backbone, self.ema.offline, (x,)))
            picks = [p_on.argmax(1), self.ensemble(p_on, p_off).argmax(1)]
            return torch.stack(picks + ([] if p_off is None else [p_off.argmax(1)]), dim=1)

        hits, total = None, 0
        with isolated_rng():  # a loader draws its base seed from the global RNG: training must not see this pass
            for test in self._seen_tests:
                picks, labels = extract_features(members, test, device=device,
                                                 input_size=self.backbone.input_size, in_chans=self.backbone.in_chans)
                correct = (picks.long() == labels[:, None]).sum(0).double()
                hits, total = (correct if hits is None else hits + correct), total + len(labels)
        names = ["lae_online_acc", "lae_ensemble_acc", "lae_offline_acc"]
        self._members = {n: float(h) / total * 100 for n, h in zip(names, hits)}
        self.train(was_training)

    def run_metrics(self) -> dict:
        """The online module's, the offline module's and the ensemble's accuracy on the seen test sets at the end
        of the last experience (class-IL; empty when `record_members` is off or after a mid-stream resume)."""
        return dict(self._members)

    # --- costs and resume ------------------------------------------------------------------------
    def load_state_dict(self, state, strict: bool = True):
        n_heads = len({k.split(".")[1] for k in state if k.startswith("heads.")})
        while len(self.heads) < n_heads:
            w = state[f"heads.{len(self.heads)}.weight"]
            self.heads.append(self._new_head(w.shape[0], init=False).requires_grad_(False))
        if self.ema is None and any(k.startswith("ema.") for k in state):
            self.ema = self._new_ema()
        return super().load_state_dict(state, strict=strict)

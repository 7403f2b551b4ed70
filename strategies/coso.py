"""CoSO: Continuous Subspace Optimization for continual learning (NeurIPS 2025).

Reference code: quinn-ch/CoSO (`coso/coso_projector.py`, `coso/adamw.py`, `models/coso.py`, `exps/*.json`), built
on LAMDA-PILOT and GaLore; facts in shared/reference/lora_subspace_sparse.md section 2. Algorithm:

    set-up: freeze the pre-trained ViT except the weights of the `targets` linears (attn.proj in every block);
        historical basis M_l empty for every target l;
    experience t:
        1. head: append a new Linear(d -> |classes of t|); only it and the targets train;
        2. every step: CE(head_t(f(x)) / T, y) on the current task's classes (T = 3); for each target:
           G' = G - M M^T G; every `update_gap` steps P = top-`proj_rank` left singular vectors of G' and the
           FD sketch absorbs the top-`sketch_rank` directions; Adam on P^T G'; W <- W - lr P (Adam direction)
           (`cl.models.subspace.CoSOAdam`); the head trains with AdamW at `fc_lr`;
        3. task end: k = #{i : cumsum(sigma_i^2 / sum sigma^2) < energy_threshold} over the sketch's spectrum,
           M <- [M, U_S[:, :k]]; optimiser state and schedule restart with the next experience;
        lr per epoch e of E: base * cos(99 pi e / (200 (E - 1))) for both groups (ends at 0.016 of the base);
    inference: concatenate all heads' logits (no temperature), argmax over all seen classes.

`svd: exact` is the reference (full SVD per step); `svd: fast` uses a randomized low-rank SVD
(`torch.svd_lowrank`, rank + 11 columns, 2 power iterations; the exact SVD where that would be full width) for the
projection and the FD merge. Both run batched over the targets' stacked gradients (`cl.models.subspace.CoSOAdam`).

Deliberate differences from the reference:
- `head_init: default` (the default, the reference's `nn.Linear` init in utils/inc_net.py); `zeros` is an option.
  Cross-entropy over one head's classes never moves that head's mean logit (sum_c dL/dz_c = 0; for a 2-class head
  under Adam the two rows stay exact opposites), so each head keeps its random initial offset w_sum . f + b_sum for
  ever, and class-IL inference compares heads through it. On a pre-trained ViT the learnt margins dwarf it (argued,
  not measured); on the random vit-tiny of the test stream, whose features are almost one shared vector, it
  decides most predictions (docs/coso.md), which `zeros` avoids. With `zeros` the first step of each task passes
  no gradient to the targets (the new head is zero), so it updates the head only, and CoSOAdam refreshes the
  projection again at the next step instead of keeping a blank one for `update_gap` steps (with the reference's
  init the gradient is never all-zero and this early refresh never fires).
- `project_p: true` (off by default: not in the reference) projects P out of M after each refresh
  (cl/models/subspace.py CoSOAdam): without it, P's null-space columns let Adam-amplified noise into M (2e-3 of the
  step on vit-tiny; 2e-7 with it). tests/test_reference_coso.py checks the default against the reference step.
- Global class ids: each head's outputs are placed at its classes' global ids (the reference relabels classes).
- The historical basis is stored per target as a tensor in the strategy state (resume-safe), concatenated without
  re-orthogonalisation as in the reference.
- The lr schedule is the reference's (`begin_epoch`), with E = 1 meaning a constant lr (the reference divides by
  E - 1 = 0); the trainer's scheduler is set to constant in configs/strategy/coso.yaml and overwritten anyway.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl.engine.errors import ConfigError
from cl.engine.strategy import Batch, Strategy
from cl.models.subspace import SVD_MODES, CoSOAdam, energy_rank


HEAD_INITS = ("default", "zeros")


class CoSO(Strategy):
    name = "coso"
    supports = ("class_il", "task_il")

    def __init__(self, targets=("attn.proj",), proj_rank: int = 50, sketch_rank: int = 120, update_gap: int = 1,
                 energy_threshold: float = 0.98, fd_decay: float = 1.0, temperature: float = 3.0,
                 lr: float = 4e-4, fc_lr: float = 4e-4, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, svd: str = "exact", head_init: str = "default", project_p: bool = False,
                 **hparams):
        if svd not in SVD_MODES:
            raise ConfigError(f"strategy.svd='{svd}' is unknown: use one of {', '.join(SVD_MODES)}")
        if head_init not in HEAD_INITS:
            raise ConfigError(f"strategy.head_init='{head_init}' is unknown: use one of {', '.join(HEAD_INITS)}")
        super().__init__(targets=list(targets), proj_rank=proj_rank, sketch_rank=sketch_rank,
                         update_gap=update_gap, energy_threshold=energy_threshold, fd_decay=fd_decay,
                         temperature=temperature, lr=lr, fc_lr=fc_lr, betas=list(betas), eps=eps,
                         weight_decay=weight_decay, svd=svd, head_init=head_init, project_p=bool(project_p),
                         **hparams)
        self.h = self.hparams
        self._opt: CoSOAdam | None = None

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        backbone.requires_grad_(False)
        model = getattr(backbone, "model", backbone)
        self.target_names = [n for n, m in model.named_modules()
                             if isinstance(m, nn.Linear) and any(n.endswith(t) for t in self.h["targets"])]
        if not self.target_names:
            raise ConfigError(f"strategy.targets={self.h['targets']} match no nn.Linear of backbone "
                              f"'{getattr(backbone, 'name', '?')}': name module suffixes such as attn.proj")
        modules = dict(model.named_modules())
        self.target_weights = [modules[n].weight for n in self.target_names]
        for w in self.target_weights:
            w.requires_grad_(True)
        self.bases: list[torch.Tensor] = [w.new_zeros(w.shape[0], 0) for w in self.target_weights]
        self.heads = nn.ModuleList()
        self.register_buffer("order", torch.full((info.n_classes,), -1, dtype=torch.long))
        self.register_buffer("class_pos", torch.zeros(info.n_classes, dtype=torch.long))

    # --- experience ------------------------------------------------------------------------------
    def _new_head(self, n_out: int) -> nn.Linear:
        head = nn.Linear(self.backbone.feature_dim, n_out, device=self.order.device)
        if self.h["head_init"] == "zeros":
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        return head

    def begin_experience(self, exp):
        classes = torch.as_tensor(list(exp.classes), dtype=torch.long, device=self.order.device)
        start = sum(h.out_features for h in self.heads)
        self.order[start:start + len(classes)] = classes
        self.class_pos[classes] = torch.arange(len(classes), device=classes.device)
        for head in self.heads:
            head.requires_grad_(False)
        self.heads.append(self._new_head(len(classes)))
        return [{"params": self.target_weights, "subspace": True},
                {"params": list(self.heads[-1].parameters())}]

    def configure_optimizer(self, groups):
        h = self.h
        lr = h["lr"]
        weights, head = groups
        self._opt = CoSOAdam(
            [{**weights, "lr": lr, "proj_rank": h["proj_rank"], "sketch_rank": h["sketch_rank"],
              "update_gap": h["update_gap"], "decay": h["fd_decay"], "svd": h["svd"],
              "project_p": h["project_p"]},
             {**head, "lr": h["fc_lr"]}],
            betas=tuple(h["betas"]), eps=h["eps"], weight_decay=h["weight_decay"],
            bases=dict(zip(self.target_weights, self.bases)))
        return self._opt

    def begin_epoch(self, epoch: int, n_epochs: int) -> None:
        """The reference's schedule (utils/scheduler.py CosineSchedule): lr_e = base cos(99 pi e / (200 (E - 1))),
        restarted each experience; it ends at cos(0.495 pi) = 0.016 of the base. Set absolutely at every epoch
        start, so it holds whatever the trainer's own scheduler did after the previous epoch."""
        if self._opt is None:
            return
        factor = math.cos(99 * math.pi * epoch / (200 * (n_epochs - 1))) if n_epochs > 1 else 1.0
        for group, base in zip(self._opt.param_groups, (self.h["lr"], self.h["fc_lr"])):
            group["lr"] = base * factor

    def train_step(self, batch: Batch) -> torch.Tensor:
        logits = self.heads[-1](self.backbone(batch.x)) / self.h["temperature"]
        return F.cross_entropy(logits, self.class_pos[batch.y])

    @torch.no_grad()
    def end_experience(self, exp, loader) -> None:
        """Energy rule: grow each target's historical basis by the sketch's leading directions."""
        if self._opt is None:
            return
        for i, w in enumerate(self.target_weights):
            state = self._opt.state.get(w, {})
            if "sketch_u" not in state:
                continue
            k = energy_rank(state["sketch_s"], self.h["energy_threshold"])
            self.bases[i] = torch.cat([self.bases[i], state["sketch_u"][:, :k].to(self.bases[i])], dim=1)
        self._opt = None

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        feats = self.backbone(x)
        cat = torch.cat([h(feats) for h in self.heads], dim=1)
        out = cat.new_full((x.shape[0], self.info.n_classes), float("-inf"))
        out[:, self.order[:cat.shape[1]]] = cat
        return out

    # --- state -----------------------------------------------------------------------------------
    def get_extra_state(self):
        return {"bases": [b.cpu() for b in self.bases], "head_sizes": [h.out_features for h in self.heads]}

    def set_extra_state(self, state) -> None:
        self.bases = [b.to(w) for b, w in zip(state["bases"], self.target_weights)]

    def load_state_dict(self, state_dict, strict: bool = True):
        extra = state_dict.get("_extra_state")
        if extra is not None:
            while len(self.heads) < len(extra["head_sizes"]):
                self.heads.append(self._new_head(extra["head_sizes"][len(self.heads)]))
        return super().load_state_dict(state_dict, strict=strict)

    def describe(self):
        return {**super().describe(), "history_rank": [int(b.shape[1]) for b in self.bases]}

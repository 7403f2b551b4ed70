"""MOS: Model Surgery for pre-trained model-based class-incremental learning (Sun et al., AAAI 2025).

Reference code: sun-hailong/AAAI25-MOS (`models/mos.py`, `backbone/vit_mos.py`, `utils/inc_net.py::MOSNet`),
identical in LAMDA-PILOT. Algorithm, per experience t:

    1. train the current adapter set (one AdaptFormer adapter per block, parallel to the MLP, bottleneck 16,
       scale 0.1) and a linear head: CE over the current classes (old logits -inf) + reg * L_orth, where
       L_orth = CE(M M^T / 0.8, arange) with M = [stored means of old classes; batch features]; the adapter is
       warm-started from the previous experience's (never re-initialised), its lr is the trainer's and the
       head's 0.1x (SGD, momentum 0.9, cosine);
    2. adapter pull: cur <- (1 - m) cur + m * mean(adapters 0..t-1), m = adapter_momentum = 0.1;
    3. store a copy of the adapter set; per new class, mean and covariance (+1e-4 I) of its features under it;
    4. t > 0: classifier alignment: crct_epochs of SGD (ca_lr, cosine) on the head only, each epoch sampling
       5 x batch size pseudo-features per seen class from N(mu_c, Sigma_c);
    5. prototype head: each new class's mean feature under adapter set 0 (the first-session adapter), cosine.
    Inference: features under every adapter set; from the task of the prototype head's prediction, at most 4
    rounds of head(features[task]) -> predicted class -> its task (self-refined retrieval); the score is
    softmax(refined logits) + softmax((T + 1) * prototype cosine logits).

Deliberate choices (see `pull`; each remaining difference from the reference: docs/fidelity_mos.md):
- `pull: reference` (default) reproduces the code that produced the published numbers
  (backbone/vit_mos.py:328-378): the pull runs before *every block* of every forward pass with an adapter set
  k >= 1 (so depth + 1 = 13 pulls per training step: 12 in the forward + 1 after the step), also while computing
  the class statistics and at test time, where it overwrites the stored sets k >= 1 toward the mean of sets
  0..k-1 on every test batch. Each pull reassigns `.data` a new tensor as the reference does, so autograd's saved
  weights stay those the forward used (an in-place pull gave wrong gradients: issue 18). Because the stored sets
  change once per test batch, the batching is part of the method here, as there: the trainer evaluates with
  the training batch size (`test_batch_size`; models/mos.py:91), the class statistics are computed class by class
  in batches of 3 x the training batch size (models/mos.py:201-216), and from the second task on the prototypes
  are extracted with set 0's adapter dropout active (the reference's `replace_fc` runs in train mode after
  classifier alignment). `pull: clean` applies the pull described in the paper once after each optimiser step
  and never touches stored sets; it may not reproduce the published numbers, and evaluates with the trainer's
  `eval_batch_size` (its scores do not depend on the batching).
- `eval_batch_size` (strategy) is the batch size of MOS's own extraction passes that the batching cannot change
  (prototypes; clean mode's statistics), not the test batch size.
- The reference computes adapter-0 features twice per test image (prototype head and retrieval); here once
  (identical values), so `forward_passes_per_test_image` is T + 1.
- Covariance sampling uses one Cholesky factor per class per alignment run instead of re-factorising every
  epoch: the same distribution.

Speed (issue 10, docs/speed.md): `batched_eval: true` (default) runs the T adapter sets of a test batch in ONE
backbone pass: the batch is repeated T times along dim 0 and each block's adapter slot holds a `StackedAdapters`
that applies set k to chunk k with batched matmuls; the frozen trunk sees one T*B batch instead of T batches of B.
The reference pull keeps its semantics: before every block, every set k >= 1 is pulled exactly as in the
sequential path (same arithmetic, same order per set), so the stored sets end bitwise the same and the scores
equal the sequential path's up to matmul rounding (tested). `batched_eval: false` is the sequential path.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cl.models import peft
from cl.engine.feature_cache import features_of
from cl.engine.features import class_gaussian
from cl.models.heads import CosineLinear
from cl.engine.strategy import Batch, Strategy
from cl.engine.subset import TargetSubset

PULL_MODES = ("reference", "clean")


class MOS(Strategy):
    name = "mos"
    supports = ("class_il", "task_il")
    stored_buffers = ("prototypes", "cls_mean", "cls_cov")

    def __init__(self, ffn_num: int = 16, adapter_scale: float = 0.1, adapter_dropout: float = 0.1,
                 reg: float = 0.1, adapter_momentum: float = 0.1, pull: str = "reference", ensemble: bool = True,
                 crct_epochs: int = 30, ca_lr: float = 0.005, ca_weight_decay: float | None = None,
                 ca_samples_factor: int = 5, ca_storage: str = "covariance", max_refine: int = 4,
                 orth_temperature: float = 0.8, eval_batch_size: int = 128, batched_eval: bool = True,
                 **hparams):
        super().__init__(ffn_num=ffn_num, adapter_scale=adapter_scale, adapter_dropout=adapter_dropout, reg=reg,
                         adapter_momentum=adapter_momentum, pull=pull, ensemble=ensemble, crct_epochs=crct_epochs,
                         ca_lr=ca_lr, ca_weight_decay=ca_weight_decay, ca_samples_factor=ca_samples_factor,
                         ca_storage=ca_storage, max_refine=max_refine, orth_temperature=orth_temperature,
                         eval_batch_size=eval_batch_size, batched_eval=batched_eval, **hparams)
        if pull not in PULL_MODES:
            raise ValueError(f"mos.pull must be one of {PULL_MODES}, got {pull!r}")
        if ca_storage not in ("covariance", "variance"):
            raise ValueError(f"mos.ca_storage must be covariance or variance, got {ca_storage!r}")
        self.h = self.hparams

    # --- set-up ----------------------------------------------------------------------------------
    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        if self.h["ca_weight_decay"] is None:  # the reference hands the task's weight decay to the CA optimiser
            self.h["ca_weight_decay"] = self.trainer_cfg.weight_decay
        backbone.requires_grad_(False)
        vit = backbone.model
        self.blocks = peft.wrap_blocks(vit)
        self.cur_adapter = peft.add_adapters(vit, bottleneck=self.h["ffn_num"], scale=self.h["adapter_scale"],
                                             dropout=self.h["adapter_dropout"])
        self.adapter_list = nn.ModuleList()
        d, c = backbone.feature_dim, info.n_classes
        self.head = nn.Linear(d, c)
        nn.init.trunc_normal_(self.head.weight, std=0.02)  # timm's ViT head init (the reference's head)
        nn.init.zeros_(self.head.bias)
        self.proto_head = CosineLinear(d, c, learn_sigma=False)
        self.proto_head.requires_grad_(False)
        with torch.no_grad():
            self.proto_head.weight.zero_()
        self.register_buffer("cls_mean", torch.zeros(c, d))
        cov_shape = (c, d, d) if self.h["ca_storage"] == "covariance" else (c, d)
        self.register_buffer("cls_cov", torch.zeros(cov_shape))
        self.register_buffer("cls2task", torch.full((c,), -1, dtype=torch.long))
        # Prefix sums of the stored adapters' parameters: sums[k] = sum of adapter sets 0..k.
        self.register_buffer("adapter_sums", torch.zeros(0, self._flat_size()))
        self._pull_targets: dict = {}  # (index, m) -> m * sums[index-1] / index (cleared when the sums change)
        self._pull_index: int | None = None  # which set the reference pulls act on during a forward
        self._pull_target: nn.ModuleList | None = None
        for block in self.blocks:
            block.register_forward_pre_hook(self._reference_pull_hook)

    def _flat_size(self) -> int:
        return sum(p.numel() for p in self.cur_adapter.parameters())

    # --- the adapter pull ------------------------------------------------------------------------
    @torch.no_grad()
    def pull(self, adapters: nn.ModuleList, index: int) -> None:
        """adapters <- (1 - m) adapters + m * mean(stored sets 0..index-1) (no-op for index 0).

        Each parameter's `.data` is *reassigned a new tensor*, as the reference's `reweight_adapter` does
        (AAAI25-MOS backbone/vit_mos.py:337-344, `w.data = (1 - m) * w.data + m * sum[idx-1] / idx`, the same
        arithmetic in the same order). Why not in place: in reference mode the pull runs before every block of a
        training forward, after earlier blocks have saved (views of) these weights for backward. A new tensor
        leaves those saved tensors holding the values the forward used, so backward through block j uses the
        weights pulled j + 1 times, as in the reference; an in-place update would make every block's backward
        see the weights after the last pull (wrong gradients in all blocks but the last; issue 18, defect 1,
        guarded by tests/test_reference_mos.py). Same values as the in-place form outside autograd."""
        m = self.h["adapter_momentum"]
        if m == 0 or index == 0:
            return
        target = self._pull_targets.get((index, m))
        if target is None or target.device != self.adapter_sums.device:
            # m * sum[index-1] / index, in the reference's order: (m * sum) / idx
            target = self._pull_targets[(index, m)] = (m * self.adapter_sums[index - 1]) / index
        offset = 0
        for p in adapters.parameters():
            n = p.numel()
            p.data = (1 - m) * p.data + target[offset: offset + n].view_as(p).to(p.dtype)
            offset += n

    def _reference_pull_hook(self, module, args) -> None:
        if self.h["pull"] != "reference":
            return
        if self._pull_target is not None:
            self.pull(self._pull_target, self._pull_index)
        for index, adapters in getattr(self, "_pull_batch", ()):  # batched evaluation: every set k >= 1
            self.pull(adapters, index)

    def features(self, x: torch.Tensor, k: int | None = None, pulling: bool = False) -> torch.Tensor:
        """CLS features with adapter set k (None: the current, trainable set); `pulling` enables the
        reference's per-block pulls during this forward."""
        adapters = self.cur_adapter if k is None or k >= len(self.adapter_list) else self.adapter_list[k]
        index = self._task() if k is None else k
        peft.set_mlp_adapters(self.backbone.model, list(adapters))
        self._pull_target, self._pull_index = (adapters, index) if pulling else (None, None)
        try:
            return self.backbone(x)
        finally:
            # The blocks' slots always hold the trainable set between calls, so the checkpoint is canonical.
            self._pull_target = self._pull_index = None
            peft.set_mlp_adapters(self.backbone.model, list(self.cur_adapter))

    # --- training --------------------------------------------------------------------------------
    def begin_experience(self, exp):
        # Host-side copies for the step (issue 10: no device->host sync per step): the task index and the old
        # classes whose stored means enter L_orth.
        self._task_index = int(self.experiences_seen) - 1
        self._old_classes = (self.seen_mask & ~self.current_mask).nonzero().flatten()
        self.cls2task[list(exp.classes)] = self._task_index
        self.cur_adapter.requires_grad_(True)
        self.head.requires_grad_(True)
        return [{"params": list(self.cur_adapter.parameters())},
                {"params": list(self.head.parameters()), "lr_scale": 0.1}]

    def _task(self) -> int:
        """The current task index, without reading the device buffer when begin_experience has cached it."""
        t = getattr(self, "_task_index", None)
        return int(self.experiences_seen) - 1 if t is None else t

    def orth_loss(self, feats: torch.Tensor) -> torch.Tensor:
        old = getattr(self, "_old_classes", None)
        if old is None:
            old = (self.seen_mask & ~self.current_mask).nonzero().flatten()
        m = torch.cat([self.cls_mean[old], feats.float()]) if len(old) else feats.float()
        sim = m @ m.T / self.h["orth_temperature"]
        return self.h["reg"] * F.cross_entropy(sim, torch.arange(len(m), device=m.device))

    def train_step(self, batch: Batch) -> torch.Tensor:
        feats = self.features(batch.x, pulling=True)
        logits = self.head(feats).masked_fill(~self.current_mask, float("-inf"))
        return F.cross_entropy(logits.float(), batch.y) + self.orth_loss(feats)

    def after_optimizer_step(self) -> None:
        self.pull(self.cur_adapter, self._task())

    # --- end of experience -----------------------------------------------------------------------
    def end_experience(self, exp, loader) -> None:
        t = int(self.experiences_seen) - 1
        device = self.head.weight.device
        self._store_adapter()
        self.eval()
        new = torch.tensor(list(exp.classes), device=device)
        train_bs = loader.batch_size if loader is not None else None
        if train_bs is not None:
            self._train_batch_size = int(train_bs)
        if self.h["pull"] == "reference":
            # As the reference's `_compute_mean` (models/mos.py:201-216): class by class, in batches of 3 x the
            # training batch size, with the current set pulled before every block of every batch, so each class's
            # Gaussian is computed under the same sequence of adapter states as there.
            stats_bs = 3 * (train_bs or self.h["eval_batch_size"])
            if getattr(exp.train, "targets", None) is None:
                raise ValueError("mos pull=reference computes class statistics class by class and needs the training "
                                 "set's `targets` (scenarios/datasets/base.py); use strategy.pull=clean for this stream")
            targets = np.asarray(exp.train.targets)
            for c in list(exp.classes):
                part = TargetSubset(exp.train, np.flatnonzero(targets == c))
                feats = features_of(self, None, lambda x: self.features(x, k=None, pulling=True), part,
                                    device=device, batch_size=stats_bs)[0]
                self.cls_mean[c], self.cls_cov[c] = class_gaussian(feats, self.h["ca_storage"])
        else:
            # No pulls inside a forward: the batching cannot change the features. At t = 0 the current set is set
            # 0, the same features as the prototypes' below, so the trainer's feature cache computes them once.
            feats, labels = self._extract(exp.train, k=None, pulling=False, device=device,
                                          key="set0" if t == 0 else None)
            for c in new.tolist():
                self.cls_mean[c], self.cls_cov[c] = class_gaussian(feats[labels == c], self.h["ca_storage"])
        if t > 0:
            self.align_classifier(self.h["ca_samples_factor"] * (train_bs or 16))
        if self.h["pull"] == "reference" and t > 0:
            # The reference's `replace_fc` (models/mos.py:51-72, called at :101) runs right after
            # `classifer_align`, which left the backbone in train mode (:248), so from the second task on the
            # prototypes are extracted with set 0's adapter dropout active (random, hence no feature cache).
            self.adapter_list[0].train()
            try:
                proto, plabels = self._extract(exp.train, k=0, pulling=False, device=device, key=None)
            finally:
                self.adapter_list[0].eval()
        else:
            proto, plabels = self._extract(exp.train, k=0, pulling=False, device=device, key="set0")
        with torch.no_grad():
            for c in new.tolist():
                self.proto_head.weight[c] = proto[plabels == c].mean(0)

    @torch.no_grad()
    def _store_adapter(self) -> None:
        stored = copy.deepcopy(self.cur_adapter).requires_grad_(False)
        self.adapter_list.append(stored)
        flat = torch.cat([p.detach().flatten().float() for p in self.cur_adapter.parameters()])
        prev = self.adapter_sums[-1] if len(self.adapter_sums) else torch.zeros_like(flat)
        self.adapter_sums = torch.cat([self.adapter_sums, (prev + flat).unsqueeze(0)])
        self._pull_targets.clear()

    def _extract(self, dataset, k, pulling, device, key=None):
        """Features of `dataset` under adapter set k; `key` names a frozen encoder (set 0 never changes after the
        first session) so that the trainer's feature cache may serve them."""
        return features_of(self, key, lambda x: self.features(x, k=k, pulling=pulling), dataset, device=device,
                           batch_size=self.h["eval_batch_size"])

    def align_classifier(self, per_class: int) -> None:
        """Classifier alignment: the head alone on pseudo-features from every seen class's Gaussian."""
        seen = self.seen_mask.nonzero().flatten()
        device = self.head.weight.device
        means = self.cls_mean[seen]
        if self.h["ca_storage"] == "covariance":
            scale = torch.linalg.cholesky(self.cls_cov[seen].double()).float()
        else:
            scale = self.cls_cov[seen].sqrt()
        epochs = self.h["crct_epochs"]

        def epoch_batches(epoch: int):
            """This epoch's pseudo-features: per_class draws per seen class, shuffled, in class-sized chunks."""
            eps = torch.randn(len(seen), per_class, means.shape[1], device=device)
            if scale.dim() == 3:
                samples = means[:, None] + eps @ scale.transpose(1, 2)
            else:
                samples = means[:, None] + eps * scale[:, None]
            x = samples.reshape(-1, means.shape[1])
            y = seen.repeat_interleave(per_class)
            order = torch.randperm(len(x), device=device)
            x, y = x[order], y[order]
            return [(x[i * per_class:(i + 1) * per_class], y[i * per_class:(i + 1) * per_class])
                    for i in range(len(seen))]

        def step(batch):
            xb, yb = batch
            return F.cross_entropy(self.head(xb).masked_fill(~self.seen_mask, float("-inf")), yb)

        self.head.train()
        with torch.enable_grad():
            # The reference's optimiser and schedule (SGD, momentum 0.9, cosine to 0), in fp32, every chunk: none
            # of the trainer's settings applies but its machinery (progress bar, stop checks, loss checks).
            self.optimiser(device).phase(
                step, epoch_batches, params=list(self.head.parameters()), desc="mos: classifier alignment",
                autocast=False, epochs=epochs, optimizer="sgd", lr=self.h["ca_lr"], momentum=0.9,
                weight_decay=self.h["ca_weight_decay"], scheduler="cosine", min_lr=0.0, clip_grad_norm=None,
                limit_train_batches=None)
        self.head.eval()

    # --- inference -------------------------------------------------------------------------------
    @property
    def forward_passes_per_test_image(self) -> int:  # type: ignore[override]
        return max(1, len(self.adapter_list))

    def features_all_sets(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of `x` under every stored set in one backbone pass over a [T * B] batch (see module doc);
        the reference pulls of sets k >= 1 run before every block, as in T calls of `features(x, k, True)`."""
        n_sets, b = len(self.adapter_list), x.shape[0]
        depth = len(self.blocks)
        stacked = [StackedAdapters([self.adapter_list[k][j] for k in range(n_sets)]) for j in range(depth)]
        peft.set_mlp_adapters(self.backbone.model, stacked)
        self._pull_batch = [(k, self.adapter_list[k]) for k in range(1, n_sets)]  # a plain list, not a submodule
        try:
            out = self.backbone(x.repeat(n_sets, *([1] * (x.dim() - 1))))
        finally:
            self._pull_batch = []
            peft.set_mlp_adapters(self.backbone.model, list(self.cur_adapter))
        return list(out.split(b))

    @property
    def test_batch_size(self) -> int | None:  # type: ignore[override]
        """The batch size the trainer evaluates with (cl/engine/strategy.py). Reference mode: the training batch size,
        as the reference's test loader (models/mos.py:91): the pulls rewrite the stored sets once per test batch,
        so the scores depend on it. Clean mode: None (the trainer's `eval_batch_size`; scores do not depend on
        it). Known from the first `end_experience` of this process; before it nothing is stored, nothing pulled."""
        if self.h["pull"] != "reference":
            return None
        return getattr(self, "_train_batch_size", None)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        n_sets = len(self.adapter_list)
        if n_sets == 0:  # nothing learnt yet (trainer.eval_future before the first experience)
            return x.new_zeros(x.shape[0], self.info.n_classes, dtype=torch.float32)
        if self.h["batched_eval"] and n_sets > 1:
            feats = [f.float() for f in self.features_all_sets(x)]
        else:
            feats = [self.features(x, k=k, pulling=True).float() for k in range(n_sets)]
        unseen = ~self.seen_mask
        orig = self.proto_head(feats[0]).masked_fill(unseen, float("-inf"))
        all_logits = torch.stack([self.head(f).float() for f in feats]).masked_fill(unseen, float("-inf"))
        refined = self.refine(orig, all_logits)
        if not self.h["ensemble"]:
            return refined
        return F.softmax(refined, dim=1) + F.softmax(orig * n_sets, dim=1)

    def refine(self, orig_logits: torch.Tensor, all_logits: torch.Tensor) -> torch.Tensor:
        """Self-refined retrieval: start from the prototype head's task, re-pick the adapter set from the
        head's prediction, at most `max_refine` head evaluations per sample (vectorised over the batch)."""
        batch = torch.arange(orig_logits.shape[0], device=orig_logits.device)
        idx = self.cls2task[orig_logits.argmax(1)].clamp(min=0)
        active = torch.ones_like(idx, dtype=torch.bool)
        out = torch.empty_like(all_logits[0])
        rounds = self.h["max_refine"]
        for r in range(rounds):
            cur = all_logits[idx, batch]
            new = self.cls2task[cur.argmax(1)].clamp(min=0)
            out[active] = cur[active]
            stop = (new == idx) | (r == rounds - 1)
            active = active & ~stop
            idx = torch.where(active, new, idx)
            if not active.any():
                break
        return out

    # --- resume ----------------------------------------------------------------------------------
    def load_state_dict(self, state, strict: bool = True):
        stored = {int(k.split(".")[1]) for k in state if k.startswith("adapter_list.")}
        while len(self.adapter_list) < len(stored):
            self.adapter_list.append(copy.deepcopy(self.cur_adapter).requires_grad_(False))
        self.adapter_sums = torch.zeros_like(state["adapter_sums"])
        self._pull_targets.clear()
        return super().load_state_dict(state, strict=strict)


class StackedAdapters(nn.Module):
    """T AdaptFormer adapters of one block applied to T chunks of a [T * B, ...] batch: chunk k through adapter
    k, as batched matmuls over stacked weights (read at call time, so the pulls before the block count).
    Inference only (dropout is the identity in eval mode; a LayerNorm-in or learnable-scale adapter is run per
    chunk)."""

    def __init__(self, adapters: list[nn.Module]):
        super().__init__()
        self.adapters = list(adapters)  # not registered: the sets stay owned by MOS.adapter_list

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ads = self.adapters
        t = len(ads)
        if any(a.ln is not None or isinstance(a.scale, nn.Parameter) or a.training for a in ads):
            return torch.cat([a(c) for a, c in zip(ads, x.chunk(t))])
        shape = x.shape
        h = x.reshape(t, -1, shape[-1])
        wd = torch.stack([a.down.weight for a in ads]).to(h.dtype)     # [T, r, D]
        bd = torch.stack([a.down.bias for a in ads]).to(h.dtype)       # [T, r]
        wu = torch.stack([a.up.weight for a in ads]).to(h.dtype)       # [T, D, r]
        bu = torch.stack([a.up.bias for a in ads]).to(h.dtype)         # [T, D]
        z = ads[0].act(torch.baddbmm(bd[:, None], h, wd.transpose(1, 2)))
        y = torch.baddbmm(bu[:, None], z, wu.transpose(1, 2))
        return (y * ads[0].scale).reshape(shape)

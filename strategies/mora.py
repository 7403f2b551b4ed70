"""MoRA (MoRAM): a self-activated sparse mixture of rank-1 experts, on CLIP (union-label) and on text streams.

Paper: "MoRA: Mixture of Rank-1 Experts ..." (arXiv 2506.21035, ICML'26 as MoRAM); reference code
`Artificer-AI-Lab/MoRAM`, `XTAIL/loralib/moram.py` (the layer) and `XTAIL/models/moram.py` (training).

Algorithm, per adapted Linear `y = W x` (q, k, v, out_proj, FFN in and out, in BOTH CLIP encoders):
    each task adds r rank-1 experts: rows of A_t [r, d_in] (keys, kaiming_uniform a=sqrt(5)), columns of
    B_t [d_out, r] (values, zeros); A_all = [A_1..A_t], B_all = [B_1..B_t], R = r * t
    z = x A_all^T                              per token, [.., R]
    s = z / ||z||_2                            self-activation: each expert scores its own relevance, no router
    keep the top-k of s (k = max(topk, 2)), the rest -inf;  w = softmax(masked / tau)
    at inference only: w <- w * 1[s >= delta]  (rank pruning)
    y = W x + B_all (w * z)
Per task t (dataset with classes C_t, all earlier classes S):
    freeze A_1..A_{t-1}, B_1..B_{t-1}; train only A_t, B_t (AdamW, no replay, no extra loss)
    loss = CE(image -> text over S u C_t, S masked to -inf)  +  CE(text -> image, targets = same-class mask)
Prediction: cosine of the image embedding with the text embeddings of EVERY class name of the union.

Defaults are the X-TAIL runner's (`runner_moram.sh`): r = 16, top-k = 16, tau = 0.01, delta = 0.2, AdamW lr 5e-4,
wd 0, cosine, batch 64. Differences from the reference code, on purpose:
- The released code also encodes the old prompts S each task, but masks them out of the image->text CE and gives
  them all-zero targets in the text->image CE; their only effect is the mean's denominator |S| + |C_t|. Here the
  old prompts are not encoded and the text->image sum is divided by that same count: the same loss, cheaper.
- The reference trains 500 iterations per task with AdamW betas (0.9, 0.9999) and a per-iteration cosine; the
  engine trains epochs with the trainer's AdamW (betas (0.9, 0.999)) and a per-epoch cosine.
- k is also capped at R (torch.topk needs k <= R; the reference's r = topk never hits the cap).
- TRACE's `lora_alpha / r` scaling of the newest B is not implemented (X-TAIL's scaling is 1).

Text streams (`text` kind, strategies/mora_text.py), a departure from the paper's language setting:
    the paper's language experiments are TRACE with LLMs (generation, next-token loss). Here the stream is the SLM
    issue's text classification (scenarios/kinds/text.py): the same experts go on the language model's q/k/v/out and FFN
    in/out Linears (found by name, `TEXT_TARGETS`), one new set per task, old ones frozen; on top sits `finetune`'s
    text head: one Linear over all classes, trained (all rows) with CE over the classes seen so far (unseen ones at
    -inf), no task id at test time. `strategy.encoders` does not apply (one tower). The X-TAIL defaults (r, top-k,
    tau, delta, AdamW lr 5e-4) are kept; nothing else is tuned for text. The reference's TRACE runner adapts
    q/k/v/o_proj only (`strategy.targets=[q,k,v,o]` gives that) and scales the newest B by lora_alpha / r = 2
    (not implemented, as above); the default here keeps X-TAIL's six targets, FFN included, as the issue asks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cl.models.clip_heads import class_prompts, encode_prompts, require_clip
from cl.engine.errors import ConfigError
from cl.engine.strategy import Batch, Strategy
from strategies.mora_text import add_text_experts

TARGETS = ("q", "k", "v", "o", "ffn_in", "ffn_out")
ENCODERS = ("vision", "text")


# --- the layer ---------------------------------------------------------------------------------------------
class RankOneExperts(nn.Module):
    """A frozen Linear plus rank-1 experts: the frozen ones of earlier tasks and the r trainable ones of this task.

    Shapes are kept as tensors (old ones [R_old, d_in] / [d_out, R_old], possibly empty) so that `state_dict`
    tells how many experts exist and a resumed run can rebuild them (`resize`)."""

    def __init__(self, base: nn.Linear, topk: int, temperature: float, threshold: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.topk, self.temperature, self.threshold = int(topk), float(temperature), float(threshold)
        d_out, d_in = base.weight.shape
        new = base.weight.new_zeros
        self.old_A = nn.Parameter(new(0, d_in), requires_grad=False)
        self.old_B = nn.Parameter(new(d_out, 0), requires_grad=False)
        self.A = nn.Parameter(new(0, d_in))
        self.B = nn.Parameter(new(d_out, 0))

    @property
    def weight(self) -> torch.Tensor:  # open_clip reads `mlp.c_fc.weight.dtype` for its cast dtype
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def n_experts(self) -> int:
        return self.old_A.shape[0] + self.A.shape[0]

    def add_task(self, rank: int) -> None:
        """Freezes the current experts (appended to the old ones) and starts r fresh ones (increment_task)."""
        with torch.no_grad():
            self.old_A = nn.Parameter(torch.cat([self.old_A, self.A]).detach(), requires_grad=False)
            self.old_B = nn.Parameter(torch.cat([self.old_B, self.B], dim=1).detach(), requires_grad=False)
            A = self.base.weight.new_empty(rank, self.base.in_features)
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            self.A = nn.Parameter(A)
            self.B = nn.Parameter(self.base.weight.new_zeros(self.base.out_features, rank))

    def resize(self, n_old: int, n_new: int) -> None:
        """Empty experts of the given counts, for `load_state_dict` to fill."""
        d_out, d_in = self.base.weight.shape
        new = self.base.weight.new_zeros
        self.old_A = nn.Parameter(new(n_old, d_in), requires_grad=False)
        self.old_B = nn.Parameter(new(d_out, n_old), requires_grad=False)
        self.A, self.B = nn.Parameter(new(n_new, d_in)), nn.Parameter(new(d_out, n_new))

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.old_A.shape[0] == 0:
            return self.A, self.B
        return torch.cat([self.old_A, self.A]), torch.cat([self.old_B, self.B], dim=1)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        """Self-activation weights w [.., R] from the projections z: top-k of z/||z|| with temperature; the
        threshold delta only when not training."""
        s = F.normalize(z, p=2, dim=-1)
        k = min(max(self.topk, 2), s.shape[-1])
        if k < s.shape[-1]:
            vals, idx = s.topk(k, dim=-1)
            s_top = torch.full_like(s, float("-inf")).scatter(-1, idx, vals)
        else:  # every expert is in the top-k: a dense softmax, no topk/scatter
            s_top = s
        w = torch.softmax(s_top / self.temperature, dim=-1)
        if not self.training and self.threshold > 0:
            w = w * (s >= self.threshold).to(w.dtype)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.n_experts == 0:
            return out
        A, B = self.keys_values()
        z = x @ A.to(x.dtype).T  # one matmul for all experts of all tasks: the batched hot path
        return out + (z * self.gate(z).to(z.dtype)) @ B.to(x.dtype).T


class ExpertAttention(nn.Module):
    """nn.MultiheadAttention as separate q/k/v/out Linears (each a RankOneExperts), same call signature and output
    as the module it replaces when no expert is active (checked in tests/test_mora.py)."""

    def __init__(self, mha: nn.MultiheadAttention, targets, **routing):
        super().__init__()
        if not mha._qkv_same_embed_dim:
            raise ConfigError("mora: attention with separate q/k/v input sizes is not supported")
        d, self.n_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        w, b = mha.in_proj_weight.detach(), mha.in_proj_bias
        for i, name in enumerate("qkv"):
            lin = nn.Linear(d, d, bias=b is not None).to(w)
            with torch.no_grad():
                lin.weight.copy_(w[i * d:(i + 1) * d])
                if b is not None:
                    lin.bias.copy_(b.detach()[i * d:(i + 1) * d])
            setattr(self, f"{name}_proj", RankOneExperts(lin, **routing) if name in targets else lin.requires_grad_(False))
        out = nn.Linear(d, d, bias=mha.out_proj.bias is not None).to(w)
        out.load_state_dict(mha.out_proj.state_dict())
        self.out_proj = RankOneExperts(out, **routing) if "o" in targets else out.requires_grad_(False)

    def forward(self, query, key, value, need_weights=False, attn_mask=None, **_):
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, d = query.shape
        h = self.n_heads

        def heads(t):
            return t.reshape(n, t.shape[1], h, d // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        o = self.out_proj(o.transpose(1, 2).reshape(n, lq, d))
        return (o if self.batch_first else o.transpose(0, 1)), None


def add_experts(clip: nn.Module, encoders, targets, **routing) -> list[RankOneExperts]:
    """Swaps every residual block's attention and FFN Linears of the chosen open_clip towers for expert layers."""
    towers = {"vision": clip.visual.transformer, "text": clip.transformer}
    layers: list[RankOneExperts] = []
    for enc in encoders:
        for block in towers[enc].resblocks:
            if {"q", "k", "v", "o"} & set(targets):
                block.attn = ExpertAttention(block.attn, targets, **routing)
                layers += [m for m in block.attn.children() if isinstance(m, RankOneExperts)]
            for name, target in (("c_fc", "ffn_in"), ("c_proj", "ffn_out")):
                if target in targets:
                    layer = RankOneExperts(getattr(block.mlp, name), **routing)
                    setattr(block.mlp, name, layer)
                    layers.append(layer)
    return layers


# --- the strategy ------------------------------------------------------------------------------------------
class MoRA(Strategy):
    name = "mora"
    supports = ("union_label", "text")

    def __init__(self, rank: int = 16, topk: int = 16, temperature: float = 0.01, threshold: float = 0.2,
                 encoders=ENCODERS, targets=TARGETS, **hparams):
        super().__init__(rank=rank, topk=topk, temperature=temperature, threshold=threshold,
                         encoders=list(encoders), targets=list(targets), **hparams)
        bad = sorted(set(encoders) - set(ENCODERS)) + sorted(set(targets) - set(TARGETS))
        if bad:
            raise ConfigError(f"mora: unknown encoder/target {bad[0]!r}: encoders from {ENCODERS}, targets from "
                              f"{TARGETS}")
        if rank < 1 or topk < 1 or temperature <= 0:
            raise ConfigError("mora needs strategy.rank >= 1, strategy.topk >= 1 and strategy.temperature > 0")
        self.rank = int(rank)
        self.routing = dict(topk=int(topk), temperature=float(temperature), threshold=float(threshold))
        self.encoders, self.targets = tuple(encoders), tuple(targets)
        self._text_cache: torch.Tensor | None = None

    def setup(self, backbone, info) -> None:
        super().setup(backbone, info)
        self.register_buffer("tasks", torch.zeros((), dtype=torch.long))
        if info.kind == "text":  # the language model's Linears, finetune's head (module docstring)
            backbone.requires_grad_(False)
            self.experts = add_text_experts(backbone, self.targets, lambda lin: RankOneExperts(lin, **self.routing))
            self.head = nn.Linear(backbone.feature_dim, info.n_classes)
            return
        require_clip(backbone, self.name)
        backbone.requires_grad_(False)
        self.experts = add_experts(backbone.clip, self.encoders, self.targets, **self.routing)
        self.prompts = class_prompts(info)
        self.seen_mask.fill_(True)  # X-TAIL: every class name of the union is a candidate from the start

    def begin_experience(self, exp):
        for layer in self.experts:
            layer.add_task(self.rank)  # old experts frozen, r fresh ones trainable
        self.tasks += 1
        self._text_cache = None
        if self.info.kind == "text":
            return [p for layer in self.experts for p in (layer.A, layer.B)] + list(self.head.parameters())
        classes = torch.as_tensor(list(exp.classes))
        self.register_buffer("_current", classes, persistent=False)
        # y -> position among the current classes (labels are global ids of the union)
        self._position = torch.full((self.info.n_classes,), -1, dtype=torch.long)
        self._position[classes] = torch.arange(len(classes))
        self._n_seen = int(sum(len(c) for c in self.info.classes_per_experience[: exp.index]))
        return [p for layer in self.experts for p in (layer.A, layer.B)]

    def train_step(self, batch: Batch) -> torch.Tensor:
        if self.info.kind == "text":  # finetune's loss: CE over the classes seen so far
            return F.cross_entropy(self.mask_unseen(self.head(self.backbone(batch.x))), batch.y)
        self._text_cache = None
        device = batch.x.device
        image = F.normalize(self.backbone(batch.x).float(), dim=-1)
        text = encode_prompts(self.backbone, [self.prompts[c] for c in self._current.tolist()])
        scale = self.backbone.logit_scale.float()
        target = self._position.to(device)[batch.y]
        # image -> text over S u C_t with S at -inf: a CE over the current classes
        loss_i = F.cross_entropy(scale * image @ text.T, target)
        # text -> image: each current prompt against the batch, target = its images (rows of S are all-zero)
        same = (target.unsqueeze(0) == torch.arange(len(text), device=device).unsqueeze(1)).float()
        log_p = F.log_softmax(scale * text @ image.T, dim=1)
        loss_t = -(same * log_p).sum() / (self._n_seen + len(text))
        return loss_i + loss_t

    @torch.no_grad()
    def class_embeddings(self) -> torch.Tensor:
        """Text embeddings of every union class under the current experts (eval mode), cached until training."""
        if self._text_cache is None:
            self._text_cache = encode_prompts(self.backbone, self.prompts)
        return self._text_cache

    @torch.no_grad()
    def predict(self, x: torch.Tensor, task_id=None) -> torch.Tensor:
        if self.info.kind == "text":
            return self.head(self.backbone(x))
        image = F.normalize(self.backbone(x).float(), dim=-1)
        return self.backbone.logit_scale.float() * image @ self.class_embeddings().to(image.device).T

    def train(self, mode: bool = True):
        self._text_cache = None
        return super().train(mode)

    def load_state_dict(self, state, strict: bool = True, **kw):
        """Rebuilds each layer's experts at the checkpoint's counts before loading them."""
        names = {id(m): n for n, m in self.named_modules()}
        for layer in self.experts:
            prefix = names[id(layer)] + "."
            if prefix + "old_A" in state:
                layer.resize(state[prefix + "old_A"].shape[0], state[prefix + "A"].shape[0])
        return super().load_state_dict(state, strict=strict, **kw)

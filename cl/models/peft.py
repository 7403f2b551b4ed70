"""Parameter-efficient fine-tuning (PEFT) modules for timm Vision Transformers (and FiLM for CNNs).

One library that every PTM strategy reuses (APER, MOS, LAE, SEMA, FSA, GS-LoRA, CoSO, ...). The behaviours
follow `/work/shared/reference/ptm_cil.md` section 3; each class says which part.

Design
------
* `PeftBlock` replaces a timm `Block` inside `vit.blocks` and re-implements its forward with optional slots
  (`mlp_adapter`, `attn_adapter`, `prefix`, `prompts`, `film`). It re-registers the block's own submodules
  under their original names (`norm1`, `attn`, `ls1`, `drop_path1`, `norm2`, `mlp`, `ls2`, `drop_path2`), so
  the pretrained keys of `state_dict()` are unchanged by wrapping (`blocks.3.attn.qkv.weight` stays) and PEFT
  keys are added next to them (`blocks.3.mlp_adapter.down.weight`). With every slot empty the forward is the
  same sequence of operations as timm's `Block.forward`, hence bitwise-identical outputs.
* `LoRALinear` likewise keeps the wrapped linear's `weight`/`bias` under their own names.
* SSF and BatchNorm FiLM are attached with forward hooks whose functions are module-level and read the scaling
  module from a child attribute (`<module>.ssf`, `<module>.film`): keys stay stable, and `copy.deepcopy` of a
  model (APER copies the PTM) gives a copy whose hooks use the copy's own parameters.
* Every PEFT module subclasses `PeftModule`; `peft_parameters(model)` collects exactly their parameters
  (for `LoRALinear` only `lora_A`/`lora_B`, never the frozen base weight).
* New modules take the train/eval mode of the model they are added to (an adapter's dropout is inactive
  when added to a model in eval mode); strategies still call `.train()`/`.eval()` as usual.
* A newly created PEFT module is an exact no-op (outputs bitwise equal to the unmodified model in eval mode),
  except `Prefix` and VPT prompts, which by construction always take part in attention (see their docstrings).

Helpers take the timm `VisionTransformer`, or a `cl.models.backbones.Backbone` wrapping one (`backbone.model`).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PeftModule", "Adapter", "LoRALinear", "Prefix", "PromptTokens", "VPTShallow", "VPTDeep", "SSF", "FiLM",
    "BlockFiLM", "PeftBlock", "prefix_attention", "wrap_blocks", "add_adapters", "set_mlp_adapters",
    "get_mlp_adapters", "add_attn_adapters", "add_lora", "merge_lora", "add_prefix", "add_vpt", "add_ssf",
    "add_film_vit", "add_film_bn", "count_params", "peft_parameters", "freeze_except_peft",
]

QKV = ("q", "k", "v")
LORA_WHERE_ALIASES = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
BLOCK_CHILDREN = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


class PeftModule(nn.Module):
    """Marker base class: the parameters returned by `own_peft_parameters()` are PEFT parameters."""

    def own_peft_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())


# ----------------------------------------------------------------------------------------------------------
# Adapter (AdaptFormer AdaptMLP)
# ----------------------------------------------------------------------------------------------------------
_ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity, None: nn.Identity}


class Adapter(PeftModule):
    """AdaptFormer bottleneck: `scale * up(dropout(act(down(ln(x)))))`; the caller adds the residual.

    Reference (ptm_cil.md 3.2/3.3/3.5): APER uses bottleneck 64, MOS 16, both ReLU, dropout 0.1 after the
    activation, fixed scale 0.1, no LayerNorm. SEMA's functional adapter is the same with bottleneck 16 but its
    scale and dropout are unused in the reference forward: build it with `scale=1.0, dropout=0.0`. LAE's adapter
    (3.4) is `Adapter(768, bottleneck=5, act="gelu", dropout=0.0, scale=1.0, scale_learnable=True)` (a learnable
    scalar, init 1).

    Init as the reference ("LoRA-style"): `down` Kaiming-uniform (a=sqrt(5)), `up` zeros, both biases zero, so a
    new adapter outputs exact zeros. `layernorm="in"` puts a LayerNorm on the input (PILOT's
    `adapter_layernorm_option="in"`); `None` (default) has none. Parameters: 2*dim*bottleneck + bottleneck + dim
    (+1 with `scale_learnable`, + 2*dim with the LayerNorm).
    """

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1,
                 act: str | None = "relu", scale_learnable: bool = False, layernorm: str | None = None):
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"Adapter act must be one of {tuple(k for k in _ACTS if k)}, got {act!r}")
        if layernorm not in (None, "in"):
            raise ValueError(f"Adapter layernorm must be None or 'in', got {layernorm!r}")
        self.dim, self.bottleneck = int(dim), int(bottleneck)
        self.ln = nn.LayerNorm(dim) if layernorm == "in" else None
        self.down = nn.Linear(dim, bottleneck)
        self.act = _ACTS[act]()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(bottleneck, dim)
        if scale_learnable:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.scale = float(scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ln is not None:
            x = self.ln(x)
        return self.up(self.dropout(self.act(self.down(x)))) * self.scale

    def extra_repr(self) -> str:
        learn = isinstance(self.scale, nn.Parameter)
        return f"dim={self.dim}, bottleneck={self.bottleneck}, scale={'learnable' if learn else self.scale}"


# ----------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------
class LoRALinear(PeftModule):
    """A frozen linear plus a low-rank update: `y = x W^T + b + (alpha/rank) * dropout(x) A^T B^T`.

    `A` is Kaiming-uniform (a=sqrt(5)), `B` zeros, so a new LoRA is an exact no-op. `alpha=None` means
    alpha = rank (scaling 1). The base `weight`/`bias` are the wrapped linear's own Parameters, kept under the
    same names (state-dict keys unchanged) and set to `requires_grad=False`.

    `targets` (fused qkv linears only): a subset of ("q", "k", "v"). The output is viewed as three equal
    slices; each targeted slice gets its *own* rank-`rank` pair, as LAE's K/V LoRA (ptm_cil.md 3.4: rank 5 on
    K and V, i.e. two independent pairs). Then `lora_A` has shape (T, rank, in) and `lora_B` (T, out/3, rank),
    T = len(targets), and the update is written into the targeted output slices only (untargeted slices are
    bitwise the base output). Without `targets`: `lora_A` (rank, in), `lora_B` (out, rank), the usual LoRA.

    `delta_weight()` is the full (out, in) update; `merge()` folds it into `weight` and zeroes `lora_B`
    (A is kept), so the module is again an exact no-op on top of the merged weight and can keep training
    (GS-LoRA style). `reset_lora()` re-draws A and zeroes B.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0,
                 targets: Sequence[str] | None = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if base._forward_hooks or base._forward_pre_hooks:
            raise ValueError("this linear has forward hooks (SSF?): add LoRA before add_ssf")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = int(rank)
        self.alpha = float(alpha) if alpha is not None else float(rank)
        self.scaling = self.alpha / self.rank
        self.weight = base.weight
        self.weight.requires_grad_(False)
        if base.bias is not None:
            self.bias = base.bias
            self.bias.requires_grad_(False)
        else:
            self.register_parameter("bias", None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if targets is None:
            self.targets = None
            self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype,
                                                   device=base.weight.device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype,
                                                   device=base.weight.device))
        else:
            targets = tuple(targets)
            bad = [t for t in targets if t not in QKV]
            if bad or not targets or len(set(targets)) != len(targets):
                raise ValueError(f"LoRA targets must be distinct names from {QKV}, got {targets}")
            if self.out_features % 3:
                raise ValueError(f"LoRA targets need a fused qkv linear (out_features divisible by 3), "
                                 f"got out_features={self.out_features}")
            self.targets = tuple(t for t in QKV if t in targets)  # canonical q, k, v order
            self.slice = self.out_features // 3
            n = len(self.targets)
            self.lora_A = nn.Parameter(torch.empty(n, rank, self.in_features, dtype=base.weight.dtype,
                                                   device=base.weight.device))
            self.lora_B = nn.Parameter(torch.zeros(n, self.slice, rank, dtype=base.weight.dtype,
                                                   device=base.weight.device))
        self.reset_lora()

    def own_peft_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A, self.lora_B]

    def reset_lora(self) -> None:
        with torch.no_grad():
            if self.lora_A.dim() == 2:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                for a in self.lora_A:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B.zero_()

    def delta_weight(self) -> torch.Tensor:
        """The full (out_features, in_features) update `scaling * B @ A` (zero rows for untargeted slices)."""
        if self.targets is None:
            return (self.lora_B @ self.lora_A) * self.scaling
        per = torch.bmm(self.lora_B, self.lora_A) * self.scaling  # (T, slice, in)
        zeros = per.new_zeros(self.slice, self.in_features)
        pieces = [per[self.targets.index(t)] if t in self.targets else zeros for t in QKV]
        return torch.cat(pieces, dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        self.weight.add_(self.delta_weight().to(self.weight.dtype))
        self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x)
        if self.targets is None:
            return out + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling
        u = torch.einsum("...i,tri->...tr", h, self.lora_A)
        d = torch.einsum("...tr,tsr->...ts", u, self.lora_B) * self.scaling  # (..., T, slice)
        zeros = d.new_zeros(d.shape[:-2] + (self.slice,))
        pieces = [d[..., self.targets.index(t), :] if t in self.targets else zeros for t in QKV]
        return out + torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, targets={self.targets}")


# ----------------------------------------------------------------------------------------------------------
# Prefix (LAE)
# ----------------------------------------------------------------------------------------------------------
class Prefix(PeftModule):
    """Learnable key/value prefix tokens for one attention layer (LAE's Prefix, ptm_cil.md 3.4).

    Parameters `key` and `value`, each (n_tokens, dim) with dim = num_heads * head_dim (the attention width);
    token p's channels [h*head_dim:(h+1)*head_dim] are head h's prefix key/value, the same split timm applies to
    its own keys. 2*n_tokens*dim parameters (LAE Prefix10 on 5 ViT-B blocks: 5*2*10*768 = 76,800).

    init: "uniform" (default, LAE's: U(0, 0.01)), "zeros", or "normal" (N(0, 0.02)).

    In attention (`prefix_attention`): the prefix keys pass through the layer's `k_norm` like the token keys
    (an Identity in ViT-B), are prepended to the token keys, and queries attend over [prefix; tokens] with the
    layer's scale. Let a = softmax over all n+N keys (after attention dropout) and lambda = sum of a over the n
    prefix keys. `compensate=True` (LAE's default, "compensatory" prefix) divides the prefix columns by lambda
    (clamped at 1e-12) and leaves the token columns as they are, so the head output is
        (1 - lambda) * Attn(q, K_tok, V_tok) + softmax(q K_pre^T * scale) V_pre,
    i.e. the prefix contribution is a full attention over the prefix alone instead of lambda times it.
    `compensate=False` is plain prefix tuning: (1 - lambda) * Attn_tok + lambda * Attn_pre.

    Not an identity at init, whatever the init: even zero keys get weight exp(0) in the softmax, so
    lambda = n / (n + sum_j exp(s_j)) > 0 and the pretrained path is damped by (1 - lambda); with zero values
    the output is exactly (1 - lambda) * Attn_tok (tested).
    """

    def __init__(self, n_tokens: int, dim: int, num_heads: int, compensate: bool = True, init: str = "uniform"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Prefix dim {dim} is not divisible by num_heads {num_heads}")
        self.n_tokens, self.dim, self.num_heads = int(n_tokens), int(dim), int(num_heads)
        self.head_dim = dim // num_heads
        self.compensate = bool(compensate)
        self.key = nn.Parameter(torch.zeros(n_tokens, dim))
        self.value = nn.Parameter(torch.zeros(n_tokens, dim))
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.key, self.value):
                if self.init == "uniform":
                    nn.init.uniform_(p, 0.0, 0.01)
                elif self.init == "normal":
                    nn.init.normal_(p, std=0.02)
                elif self.init == "zeros":
                    p.zero_()
                else:
                    raise ValueError(f"Prefix init must be 'uniform', 'normal' or 'zeros', got {self.init!r}")

    def key_value(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head prefix keys and values, each (num_heads, n_tokens, head_dim)."""
        shape = (self.n_tokens, self.num_heads, self.head_dim)
        k = self.key.view(shape).transpose(0, 1)
        v = self.value.view(shape).transpose(0, 1)
        if dtype is not None:
            k, v = k.to(dtype), v.to(dtype)
        return k, v

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, dim={self.dim}, num_heads={self.num_heads}, compensate={self.compensate}"


def _compensate(attn: torch.Tensor, n: int) -> torch.Tensor:
    lam = attn[..., :n].sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([attn[..., :n] / lam, attn[..., n:]], dim=-1)


def _prefix_bias(n_tok: int, n_pre: int, ref: torch.Tensor, attn_mask: torch.Tensor | None,
                 is_causal: bool) -> torch.Tensor | None:
    """The additive attention bias over [prefix; tokens] keys; prefix keys are visible to every query."""
    if is_causal:
        bias = ref.new_full((n_tok, n_tok), float("-inf")).triu_(1)
    elif attn_mask is None:
        return None
    elif attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=ref.dtype, device=ref.device).masked_fill_(~attn_mask,
                                                                                              float("-inf"))
    else:
        bias = attn_mask.to(ref.dtype)
    return F.pad(bias, (n_pre, 0), value=0.0)


def prefix_attention(attn: nn.Module, x: torch.Tensor, prefix: Prefix, attn_mask: torch.Tensor | None = None,
                     is_causal: bool = False) -> torch.Tensor:
    """timm `Attention.forward` with `prefix`'s key/value tokens prepended (see `Prefix` for the maths).

    Mirrors timm 1.0.31: optional gate, qkv, q_norm/k_norm, scale = head_dim**-0.5, attention dropout, the
    optional post-attention `norm`, proj, proj_drop. Without compensation and with `attn.fused_attn` it uses
    `scaled_dot_product_attention` on the concatenated keys/values; otherwise explicit matmul + softmax.
    """
    B, N, _ = x.shape
    H, hd = attn.num_heads, attn.head_dim
    attn_dim = getattr(attn, "attn_dim", H * hd)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = prefix.key_value(dtype=q.dtype)
    pk = attn.k_norm(pk)
    n = prefix.n_tokens
    k = torch.cat([pk.unsqueeze(0).expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([pv.unsqueeze(0).expand(B, -1, -1, -1), v], dim=2)
    bias = _prefix_bias(N, n, q, attn_mask, is_causal)
    if attn.fused_attn and not prefix.compensate:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        a = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            a = a + bias
        a = a.softmax(dim=-1)
        a = attn.attn_drop(a)
        if prefix.compensate:
            a = _compensate(a, n)
        out = a @ v
    out = out.transpose(1, 2).reshape(B, N, attn_dim)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj(out)
    return attn.proj_drop(out)


# ----------------------------------------------------------------------------------------------------------
# VPT prompts
# ----------------------------------------------------------------------------------------------------------
class PromptTokens(PeftModule):
    """`n_tokens` learnable tokens of width `dim` (parameter `tokens`, shape (n_tokens, dim)).

    init: "xavier" (default, VPT's: U(-b, b) with b = sqrt(6 / (3 * patch_size**2 + dim))), "normal"
    (N(0, 0.02)) or "zeros". Prompts are never an identity: they are attended to by every token, zero or not.
    """

    deep = True

    def __init__(self, n_tokens: int, dim: int, init: str = "xavier", patch_size: int = 16):
        super().__init__()
        self.n_tokens, self.dim = int(n_tokens), int(dim)
        self.tokens = nn.Parameter(torch.zeros(n_tokens, dim))
        with torch.no_grad():
            if init == "xavier":
                bound = math.sqrt(6.0 / (3 * patch_size * patch_size + dim))
                nn.init.uniform_(self.tokens, -bound, bound)
            elif init == "normal":
                nn.init.normal_(self.tokens, std=0.02)
            elif init != "zeros":
                raise ValueError(f"prompt init must be 'xavier', 'normal' or 'zeros', got {init!r}")

    def insert(self, x: torch.Tensor, position: int) -> torch.Tensor:
        tok = self.tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :position], tok, x[:, position:]], dim=1)

    def extra_repr(self) -> str:
        return f"n_tokens={self.n_tokens}, dim={self.dim}, deep={self.deep}"


class VPTShallow(PromptTokens):
    """VPT-Shallow: prompts inserted once, after the CLS (and register) tokens at the input of block 0; the
    outputs at those positions flow through all blocks and are removed after the last block (so the token count
    of `forward_features` is unchanged). Lives in `blocks[0].prompts`; `blocks[-1].strip_tokens` removes them."""

    deep = False


class VPTDeep(PromptTokens):
    """VPT-Deep prompts of one block: inserted after the CLS (and register) tokens at this block's input and
    removed from its output. Across blocks this is exactly VPT-Deep (each block's prompt tokens replace the
    previous block's prompt outputs, which are discarded), and the output token count is unchanged."""

    deep = True


# ----------------------------------------------------------------------------------------------------------
# SSF and FiLM
# ----------------------------------------------------------------------------------------------------------
class _ScaleShift(PeftModule):
    _w = "scale"
    _b = "shift"

    def __init__(self, dim: int, channel_dim: int = -1, init_std: float = 0.0):
        super().__init__()
        self.dim, self.channel_dim = int(dim), int(channel_dim)
        w = torch.ones(dim)
        b = torch.zeros(dim)
        if init_std > 0:
            w.normal_(1.0, init_std)
            b.normal_(0.0, init_std)
        self.register_parameter(self._w, nn.Parameter(w))
        self.register_parameter(self._b, nn.Parameter(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = getattr(self, self._w), getattr(self, self._b)
        if self.channel_dim not in (-1, x.dim() - 1):
            shape = [1] * x.dim()
            shape[self.channel_dim] = self.dim
            w, b = w.view(shape), b.view(shape)
        return x * w + b

    def extra_repr(self) -> str:
        return f"dim={self.dim}, channel_dim={self.channel_dim}"


class SSF(_ScaleShift):
    """SSF (Scale and Shift Features): `x * scale + shift` per channel; `scale` init 1, `shift` init 0 (exact
    identity). The SSF paper's code draws scale ~ N(1, 0.02) and shift ~ N(0, 0.02): pass `init_std=0.02` for
    that. `channel_dim` is -1 for token features, 1 for NCHW conv outputs."""


class FiLM(_ScaleShift):
    """FiLM: `x * gamma + beta` per channel, `gamma` init 1, `beta` init 0 (ptm_cil.md 3.6, FSA-FiLM).
    `channel_dim` is -1 for ViT tokens, 1 for CNN feature maps."""

    _w = "gamma"
    _b = "beta"


class BlockFiLM(PeftModule):
    """The `film` slot of a `PeftBlock`: separate FiLMs on the outputs of `norm1` and `norm2`."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1 = FiLM(dim)
        self.norm2 = FiLM(dim)


def _ssf_hook(module: nn.Module, inputs, output):
    return module.ssf(output)


def _film_hook(module: nn.Module, inputs, output):
    return module.film(output)


def _film_pre_hook(module: nn.Module, args):
    return (module.film(args[0]),) + tuple(args[1:])


# ----------------------------------------------------------------------------------------------------------
# The wrapped block
# ----------------------------------------------------------------------------------------------------------
class PeftBlock(nn.Module):
    """A timm ViT `Block` with PEFT slots; each slot is a plain attribute holding a module or None.

    Forward (x: [B, N, C]; P = num_prefix_tokens, the CLS/register tokens):
      0. `prompts` set: its tokens are inserted at position P (VPT; a `VPTDeep` is removed again at step 5).
      1. h = norm1(x); `film` set: h = film.norm1(h).
      2. a = attn(h), or `prefix_attention(attn, h, prefix)` when `prefix` is set.
         `attn_adapter` set: a = a + attn_adapter(h)  (LAE: attn(norm1 x) + adapter(norm1 x), ptm_cil.md 3.4).
         x = x + drop_path1(ls1(a)).
      3. h = norm2(x); `film` set: h = film.norm2(h). m = drop_path2(ls2(mlp(h))).
      4. `mlp_adapter` set, `mlp_adapter_position == "parallel"` (AdaptFormer / APER / MOS / SEMA, ptm_cil.md
         3.2): x = x + m + mlp_adapter(x), the adapter fed the post-attention residual stream x (not normed).
         "sequential": x = x + (m + mlp_adapter(m)) (adapter on the MLP branch output, with its residual).
         Otherwise x = x + m.
      5. A `VPTDeep` in `prompts` is removed from the output; `strip_tokens` > 0 removes that many tokens after
         position P (used on the last block to drop VPT-Shallow prompts).
    With no slot set this is timm's `Block.forward` operation for operation (bitwise equal outputs).

    Strategies may swap slots freely, e.g. MOS: `blk.mlp_adapter = adapters[k]` for each stored adapter set.
    A module assigned to a slot is registered under the block (it appears in `state_dict()`); a module held
    both here and in a strategy's list appears under both names, `parameters()` deduplicates.
    `film` may also hold one plain `FiLM`, then applied to both norm outputs (shared gamma/beta).
    """

    SLOTS = ("mlp_adapter", "attn_adapter", "prefix", "prompts", "film")

    def __init__(self, block: nn.Module, num_prefix_tokens: int = 1):
        super().__init__()
        children = set(dict(block.named_children()))
        if children != set(BLOCK_CHILDREN):
            raise TypeError(f"PeftBlock supports timm's ViT Block (children {BLOCK_CHILDREN}); "
                            f"{type(block).__name__} has {sorted(children)}")
        for name in BLOCK_CHILDREN:
            setattr(self, name, getattr(block, name))
        for slot in self.SLOTS:
            self.register_module(slot, None)
        self.mlp_adapter_position = "parallel"
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.strip_tokens = 0
        self.block_type = type(block).__name__

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        P = self.num_prefix_tokens
        prompts = self.prompts
        if prompts is not None:
            if attn_mask is not None:
                raise NotImplementedError("VPT prompts with an attention mask are not supported")
            x = prompts.insert(x, P)
        film = self.film
        h = self.norm1(x)
        if film is not None:
            h = film.norm1(h) if isinstance(film, BlockFiLM) else film(h)
        if self.prefix is not None:
            a = prefix_attention(self.attn, h, self.prefix, attn_mask=attn_mask, is_causal=is_causal)
        else:
            a = self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
        if self.attn_adapter is not None:
            a = a + self.attn_adapter(h)
        x = x + self.drop_path1(self.ls1(a))

        h = self.norm2(x)
        if film is not None:
            h = film.norm2(h) if isinstance(film, BlockFiLM) else film(h)
        m = self.drop_path2(self.ls2(self.mlp(h)))
        adapter = self.mlp_adapter
        if adapter is None:
            x = x + m
        elif self.mlp_adapter_position == "parallel":
            x = x + m + adapter(x)
        elif self.mlp_adapter_position == "sequential":
            x = x + (m + adapter(m))
        else:
            raise ValueError(f"mlp_adapter_position must be 'parallel' or 'sequential', "
                             f"got {self.mlp_adapter_position!r}")

        drop = self.strip_tokens
        if prompts is not None and getattr(prompts, "deep", True):
            drop += prompts.n_tokens
        if drop:
            x = torch.cat([x[:, :P], x[:, P + drop:]], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"position={self.mlp_adapter_position}, num_prefix_tokens={self.num_prefix_tokens}"


# ----------------------------------------------------------------------------------------------------------
# Insertion helpers
# ----------------------------------------------------------------------------------------------------------
def _vit(model: nn.Module) -> nn.Module:
    """The timm VisionTransformer inside `model` (itself, or a `Backbone`'s `.model`)."""
    if hasattr(model, "blocks"):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and hasattr(inner, "blocks"):
        return inner
    raise TypeError(f"expected a timm VisionTransformer (with .blocks) or a Backbone wrapping one, "
                    f"got {type(model).__name__}")


def _indices(vit: nn.Module, blocks: int | Iterable[int] | None) -> list[int]:
    depth = len(vit.blocks)
    if blocks is None:
        return list(range(depth))
    if isinstance(blocks, int):
        blocks = [blocks]
    out: list[int] = []
    for i in blocks:
        i = int(i)
        if not -depth <= i < depth:
            raise IndexError(f"block index {i} out of range for a ViT with {depth} blocks")
        i %= depth
        if i not in out:
            out.append(i)
    return out


def wrap_blocks(vit: nn.Module, blocks: int | Iterable[int] | None = None) -> list[PeftBlock]:
    """Replaces the chosen `vit.blocks[i]` by `PeftBlock`s (idempotent) and returns them in the given order.
    `blocks=None`: all; negative indices count from the end. State-dict keys of the block are unchanged."""
    vit = _vit(vit)
    npt = int(getattr(vit, "num_prefix_tokens", 1))
    out = []
    for i in _indices(vit, blocks):
        blk = vit.blocks[i]
        if not isinstance(blk, PeftBlock):
            blk = PeftBlock(blk, num_prefix_tokens=npt).train(blk.training)
            vit.blocks[i] = blk
        out.append(blk)
    return out


def _embed_dim(vit: nn.Module) -> int:
    return int(getattr(vit, "embed_dim", None) or vit.num_features)


def add_adapters(vit: nn.Module, blocks: int | Iterable[int] | None = None, position: str = "parallel",
                 **adapter_kwargs) -> nn.ModuleList:
    """One new `Adapter(embed_dim, **adapter_kwargs)` per chosen block in the `mlp_adapter` slot (replacing any
    there), at `position` ("parallel" / "sequential"). Returns them (block order) so a strategy can keep or copy
    them. APER: `add_adapters(vit, bottleneck=64)`; MOS: `bottleneck=16`; SEMA: `bottleneck=16, scale=1.0,
    dropout=0.0` (ptm_cil.md 3.2/3.3/3.5)."""
    if position not in ("parallel", "sequential"):
        raise ValueError(f"position must be 'parallel' or 'sequential', got {position!r}")
    vit = _vit(vit)
    dim = _embed_dim(vit)
    adapters = nn.ModuleList()
    for blk in wrap_blocks(vit, blocks):
        ad = Adapter(dim, **adapter_kwargs).train(vit.training)
        blk.mlp_adapter = ad
        blk.mlp_adapter_position = position
        adapters.append(ad)
    return adapters


def set_mlp_adapters(vit: nn.Module, adapters: Sequence[nn.Module | None],
                     blocks: int | Iterable[int] | None = None) -> None:
    """Puts `adapters[j]` (a module or None) into the `mlp_adapter` slot of the j-th chosen block. The position
    of each block is left as it is. MOS evaluates adapter set k with `set_mlp_adapters(vit, stored[k])`."""
    wrapped = wrap_blocks(vit, blocks)
    adapters = list(adapters)
    if len(adapters) != len(wrapped):
        raise ValueError(f"{len(adapters)} adapters for {len(wrapped)} blocks")
    for blk, ad in zip(wrapped, adapters):
        blk.mlp_adapter = ad


def get_mlp_adapters(vit: nn.Module, blocks: int | Iterable[int] | None = None) -> list[nn.Module | None]:
    """The modules now in the `mlp_adapter` slots of the chosen blocks (None for an empty or unwrapped one)."""
    vit = _vit(vit)
    return [getattr(vit.blocks[i], "mlp_adapter", None) for i in _indices(vit, blocks)]


def add_attn_adapters(vit: nn.Module, blocks: int | Iterable[int] | None = None, **adapter_kwargs) -> nn.ModuleList:
    """One new `Adapter` per chosen block in the `attn_adapter` slot (fed norm1(x), added to the attention
    output). LAE (ptm_cil.md 3.4): `add_attn_adapters(vit, range(5), bottleneck=5, act="gelu", dropout=0.0,
    scale=1.0, scale_learnable=True)`."""
    vit = _vit(vit)
    dim = _embed_dim(vit)
    adapters = nn.ModuleList()
    for blk in wrap_blocks(vit, blocks):
        ad = Adapter(dim, **adapter_kwargs).train(vit.training)
        blk.attn_adapter = ad
        adapters.append(ad)
    return adapters


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str, nn.Module]:
    parts = path.split(".")
    parent = root
    for p in parts[:-1]:
        parent = getattr(parent, p)
    return parent, parts[-1], getattr(parent, parts[-1])


def add_lora(vit: nn.Module, blocks: int | Iterable[int] | None = None, rank: int = 4,
             where: Sequence[str] = ("qkv",), targets: Sequence[str] | None = None, alpha: float | None = None,
             dropout: float = 0.0) -> nn.ModuleList:
    """Replaces the named linears of the chosen blocks by `LoRALinear`s and returns them (block-major order).

    `where`: paths inside a block, "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2" (short forms "qkv", "proj",
    "fc1", "fc2"). `targets` applies to "attn.qkv" only (LAE: `where=("qkv",), targets=("k", "v"), rank=5`).
    Blocks are not wrapped (not needed); a linear that already has LoRA is an error (merge or keep it)."""
    vit = _vit(vit)
    paths = [LORA_WHERE_ALIASES.get(w, w) for w in where]
    loras = nn.ModuleList()
    for i in _indices(vit, blocks):
        blk = vit.blocks[i]
        for path in paths:
            parent, name, lin = _resolve(blk, path)
            if isinstance(lin, LoRALinear):
                raise ValueError(f"blocks.{i}.{path} already has LoRA")
            t = targets if path == "attn.qkv" else None
            lora = LoRALinear(lin, rank=rank, alpha=alpha, dropout=dropout, targets=t).train(lin.training)
            setattr(parent, name, lora)
            loras.append(lora)
    return loras


def merge_lora(model: nn.Module) -> int:
    """`merge()` every `LoRALinear` in `model`; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
            n += 1
    return n


def add_prefix(vit: nn.Module, blocks: int | Iterable[int] | None = None, n_tokens: int = 10,
               compensate: bool = True, init: str = "uniform") -> nn.ModuleList:
    """One new `Prefix` per chosen block in its `prefix` slot (LAE: `add_prefix(vit, range(5), 10)`)."""
    vit = _vit(vit)
    prefixes = nn.ModuleList()
    for blk in wrap_blocks(vit, blocks):
        attn = blk.attn
        if not hasattr(attn, "qkv"):
            raise TypeError(f"prefix needs a timm Attention with a fused qkv, got {type(attn).__name__}")
        dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        pre = Prefix(n_tokens, dim, attn.num_heads, compensate=compensate, init=init).train(blk.training)
        blk.prefix = pre
        prefixes.append(pre)
    return prefixes


def add_vpt(vit: nn.Module, n_tokens: int, deep: bool, init: str = "xavier") -> nn.ModuleList:
    """VPT prompts (APER's VPT-Shallow / VPT-Deep variants, ptm_cil.md 2 and 3.2). Wraps all blocks.

    deep=True: a `VPTDeep` in every block's `prompts` slot. deep=False: one `VPTShallow` in `blocks[0].prompts`
    and `blocks[-1].strip_tokens = n_tokens`. Prompts go after the CLS/register tokens (position
    `vit.num_prefix_tokens`), so the CLS token stays at index 0; they are removed after the last block, so
    `forward_features` keeps its token count and `model(x)` still returns the CLS feature. Returns the prompt
    modules (block order)."""
    vit = _vit(vit)
    wrapped = wrap_blocks(vit)
    if any(b.prompts is not None or b.strip_tokens for b in wrapped):
        raise ValueError("this ViT already has VPT prompts")
    dim = _embed_dim(vit)
    ps = getattr(getattr(vit, "patch_embed", None), "patch_size", 16)
    ps = int(ps[0]) if isinstance(ps, (tuple, list)) else int(ps)
    out = nn.ModuleList()
    if deep:
        for blk in wrapped:
            blk.prompts = VPTDeep(n_tokens, dim, init=init, patch_size=ps)
            out.append(blk.prompts)
    else:
        wrapped[0].prompts = VPTShallow(n_tokens, dim, init=init, patch_size=ps)
        wrapped[-1].strip_tokens = int(n_tokens)
        out.append(wrapped[0].prompts)
    return out


def _attach(module: nn.Module, attr: str, child: nn.Module, hook, pre: bool = False) -> None:
    if getattr(module, attr, None) is not None:
        raise ValueError(f"{type(module).__name__} already has a .{attr}")
    module.add_module(attr, child)
    if pre:
        module.register_forward_pre_hook(hook)
    else:
        module.register_forward_hook(hook)


def add_ssf(vit: nn.Module, init_std: float = 0.0, patch_embed: bool = True) -> nn.ModuleList:
    """SSF after every Linear and LayerNorm of the blocks and after the final norm (APER+SSF / SSF's ViT).

    Exactly where (each SSF is a child `.ssf` of the module whose output it scales, applied by a forward hook):
    `patch_embed.proj` (conv output, per channel; with `patch_embed=True`) and `patch_embed.norm` if it is not
    an Identity; in every block `norm1`, `attn.qkv` (width 3*dim), `attn.proj`, `norm2`, `mlp.fc1` (width
    4*dim), `mlp.fc2`; then `vit.norm` and `vit.fc_norm` when they are LayerNorms. PEFT modules (adapters) are
    not touched. Add LoRA before SSF, not after. Returns the SSF modules in forward order."""
    vit = _vit(vit)
    out = nn.ModuleList()

    def put(mod: nn.Module, dim: int, channel_dim: int = -1) -> None:
        ssf = SSF(dim, channel_dim=channel_dim, init_std=init_std)
        _attach(mod, "ssf", ssf, _ssf_hook)
        out.append(ssf)

    pe = getattr(vit, "patch_embed", None)
    if patch_embed and pe is not None:
        put(pe.proj, pe.proj.out_channels, channel_dim=1)
        if isinstance(getattr(pe, "norm", None), nn.LayerNorm):
            put(pe.norm, pe.norm.normalized_shape[-1])
    for blk in vit.blocks:
        for path in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            _, _, mod = _resolve(blk, path)
            if isinstance(mod, nn.LayerNorm):
                put(mod, mod.normalized_shape[-1])
            elif isinstance(mod, (nn.Linear, LoRALinear)):
                put(mod, mod.out_features)
            else:
                raise TypeError(f"SSF: block.{path} is a {type(mod).__name__}, expected Linear or LayerNorm")
    for name in ("norm", "fc_norm"):
        mod = getattr(vit, name, None)
        if isinstance(mod, nn.LayerNorm):
            put(mod, mod.normalized_shape[-1])
    return out


def add_film_vit(vit: nn.Module, blocks: int | Iterable[int] | None = None) -> nn.ModuleList:
    """A `BlockFiLM` (FiLM on the outputs of norm1 and norm2) in the `film` slot of each chosen block."""
    vit = _vit(vit)
    dim = _embed_dim(vit)
    out = nn.ModuleList()
    for blk in wrap_blocks(vit, blocks):
        blk.film = BlockFiLM(dim)
        out.append(blk.film)
    return out


def add_film_bn(model: nn.Module) -> nn.ModuleList:
    """FiLM after every BatchNorm2d of a CNN (FSA-FiLM, ptm_cil.md 3.6: after BN in the stem, each MBConv
    depthwise conv and the head conv; implemented generically for *every* BatchNorm2d).

    Plain `nn.BatchNorm2d`: FiLM on its output (child `<bn>.film`, forward hook). timm `BatchNormAct2d` (BN,
    then drop, then activation in one module, as in `efficientnet_b0`): FiLM between the normalisation and the
    activation (child `<bn>.act.film`, forward pre-hook on `<bn>.act`), i.e. gamma*BN(x)+beta, then the
    activation. gamma 1 / beta 0 at init: an exact identity. Returns the FiLMs in module order."""
    out = nn.ModuleList()
    seen_acts: set[int] = set()
    for m in list(model.modules()):
        if not isinstance(m, nn.BatchNorm2d):
            continue
        film = FiLM(m.num_features, channel_dim=1)
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module):
            if id(act) in seen_acts:
                raise ValueError("two BatchNormAct2d share one activation module; cannot place FiLM before it")
            seen_acts.add(id(act))
            _attach(act, "film", film, _film_pre_hook, pre=True)
        else:
            _attach(m, "film", film, _film_hook)
        out.append(film)
    return out


# ----------------------------------------------------------------------------------------------------------
# Counting and freezing
# ----------------------------------------------------------------------------------------------------------
def count_params(module: nn.Module | Iterable[nn.Parameter], trainable_only: bool = False) -> int:
    """Number of (distinct) parameter elements; `trainable_only` counts those with requires_grad."""
    params = module.parameters() if isinstance(module, nn.Module) else module
    seen: set[int] = set()
    n = 0
    for p in params:
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def peft_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter belonging to a PEFT module inside `model` (adapters, LoRA A/B, prefixes, prompts, SSF,
    FiLM), deduplicated, in module order. Never a pretrained weight (a LoRA's base weight is excluded)."""
    out: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, PeftModule):
            for p in m.own_peft_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def freeze_except_peft(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad=False on every parameter of `model` except PEFT parameters, which are set to True.
    Returns the PEFT parameters. Freeze stored copies (e.g. MOS's old adapters) afterwards if they live inside
    `model`."""
    peft = peft_parameters(model)
    ids = {id(p) for p in peft}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    for p in peft:
        p.requires_grad_(True)
    return peft

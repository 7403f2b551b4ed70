"""Reference-step tests (issue 18) for APER (every PEFT variant), SimpleCIL, LAE and SEMA.

Each test builds the strategy on the project's test ViT (vit-tiny: 4 blocks, width 128, 32 px) and, next to it, an
independent re-statement of the reference code's computation, written here from reading the reference (file and
lines are cited at each function). The re-statement works on plain tensors copied from the same weights and runs
on the same batches; it never calls the strategy's or `cl.models.peft`'s code for the part it checks. Compared (fp32):
the loss, the gradients of the trained parameters after one step, the parameters after a few optimiser steps,
prototypes / class statistics and the predictions.

References (commits as in /work/shared/reference/ptm_cil.md):
- zhoudw-zdw/RevisitingCIL@a2e6b71 (APER, SimpleCIL)
- gqk/LAE@1680e49 (LAE)
- huiyiwang01/SEMA-CL@5a45512 (SEMA)
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import scenarios
import strategies
from cl.models import backbones
from cl.app.cli import compose_config
from cl.engine.strategy import Batch
from cl.engine.trainer import Trainer, TrainerConfig, normalize_groups

pytestmark = pytest.mark.e2e

TOL = dict(rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Shared: building the strategy, fixed batches, and a plain-tensor ViT (timm's ViT as the references run it)
# ----------------------------------------------------------------------------------------------------------
def build(strategy: str, *overrides: str, seed: int = 0):
    cfg = compose_config([f"strategy={strategy}", "scenario=synthetic", "debug=fast", "trainer.progress=false",
                          "trainer.device=cpu", *overrides])
    torch.manual_seed(seed)
    stream = scenarios.build(cfg["scenario"])
    s = strategies.build(cfg["strategy"], backbones.build(cfg["backbone"]), stream.info, trainer=cfg["trainer"])
    trainer = Trainer(TrainerConfig.from_mapping(cfg["trainer"]))
    return cfg, stream, s, trainer


def images(exp, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The experience's training images as the model sees them (uint8 -> [0, 1]) and their labels."""
    n = len(exp.train) if n is None else min(n, len(exp.train))
    xs = torch.stack([torch.as_tensor(exp.train[i][0]) for i in range(n)]).float() / 255
    ys = torch.tensor([int(exp.train[i][1]) for i in range(n)])
    return xs, ys


def batches(exp, k: int, bs: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    xs, ys = images(exp)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        idx = torch.randperm(len(ys), generator=g)[:bs]
        out.append((xs[idx], ys[idx]))
    return out


def ptm_weights(vit) -> dict[str, torch.Tensor]:
    """The pre-trained ViT's own tensors (timm names), detached copies."""
    return {k: v.detach().clone() for k, v in vit.state_dict().items()
            if not any(t in k for t in (".ssf.", "mlp_adapter", "attn_adapter", "prefix", "prompts", "lora"))}


def vit_geometry(vit) -> dict:
    blk = vit.blocks[0]
    return {"heads": blk.attn.num_heads, "eps": vit.norm.eps, "depth": len(vit.blocks),
            "patch": vit.patch_embed.proj.stride[0]}


def ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def attention(h, W, i, heads, qkv_weight=None, prefix=None, ssf=None):
    """Multi-head self-attention with explicit softmax (RevisitingCIL convs/vision_transformer_ssf.py:196-213;
    LAE libml/model/backbone/vit.py:333-363). `prefix(k, v)` may prepend key/value tokens and return a function
    that post-processes the attention matrix (LAE's compensation); `ssf` scales the qkv and proj outputs."""
    B, N, C = h.shape
    w = W[f"blocks.{i}.attn.qkv.weight"] if qkv_weight is None else qkv_weight
    qkv = F.linear(h, w, W[f"blocks.{i}.attn.qkv.bias"])
    if ssf is not None:
        qkv = qkv * ssf["qkv"][0] + ssf["qkv"][1]
    q, k, v = qkv.chunk(3, dim=-1)
    post = None
    if prefix is not None:
        k, v, post = prefix(k, v)
    hd = C // heads
    q = q.reshape(B, N, heads, hd).permute(0, 2, 1, 3)
    k = k.reshape(B, -1, heads, hd).permute(0, 2, 1, 3)
    v = v.reshape(B, -1, heads, hd).permute(0, 2, 1, 3)
    a = ((q @ k.transpose(-2, -1)) * hd ** -0.5).softmax(-1)
    if post is not None:
        a = post(a)
    out = (a @ v).transpose(1, 2).reshape(B, N, C)
    out = F.linear(out, W[f"blocks.{i}.attn.proj.weight"], W[f"blocks.{i}.attn.proj.bias"])
    if ssf is not None:
        out = out * ssf["proj"][0] + ssf["proj"][1]
    return out


def mlp(h, W, i, ssf=None):
    z = F.linear(h, W[f"blocks.{i}.mlp.fc1.weight"], W[f"blocks.{i}.mlp.fc1.bias"])
    if ssf is not None:
        z = z * ssf["fc1"][0] + ssf["fc1"][1]
    z = F.linear(F.gelu(z), W[f"blocks.{i}.mlp.fc2.weight"], W[f"blocks.{i}.mlp.fc2.bias"])
    if ssf is not None:
        z = z * ssf["fc2"][0] + ssf["fc2"][1]
    return z


def embed(x, W, geo, ssf=None):
    """Patch embedding, CLS token, position embedding (timm `_pos_embed`); SSF on the patch tokens
    (vision_transformer_ssf.py:358-371)."""
    p = F.conv2d(x, W["patch_embed.proj.weight"], W["patch_embed.proj.bias"], stride=geo["patch"])
    p = p.flatten(2).transpose(1, 2)
    if ssf is not None:
        p = p * ssf[0] + ssf[1]
    cls = W["cls_token"].expand(x.shape[0], -1, -1)
    return torch.cat([cls, p], dim=1) + W["pos_embed"]


def plain_block(x, W, i, geo):
    x = x + attention(ln(x, W[f"blocks.{i}.norm1.weight"], W[f"blocks.{i}.norm1.bias"], geo["eps"]), W, i,
                      geo["heads"])
    return x + mlp(ln(x, W[f"blocks.{i}.norm2.weight"], W[f"blocks.{i}.norm2.bias"], geo["eps"]), W, i)


def final_cls(x, W, geo):
    return ln(x, W["norm.weight"], W["norm.bias"], geo["eps"])[:, 0]


def ref_ptm(x, W, geo):
    """The frozen pre-trained model: timm ViT, CLS token after the final norm (num_classes=0)."""
    x = embed(x, W, geo)
    for i in range(geo["depth"]):
        x = plain_block(x, W, i, geo)
    return final_cls(x, W, geo)


def leaves(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_(True) for k, v in d.items()}


def assert_close(a, b, what, **tol):
    tol = {**TOL, **tol}
    assert torch.allclose(a, b, **tol), f"{what}: max abs diff {(a - b).abs().max().item():.3g}"


# ----------------------------------------------------------------------------------------------------------
# APER (RevisitingCIL) and SimpleCIL
# ----------------------------------------------------------------------------------------------------------
def aper_adapted_forward(x, W, P, kind, geo, n_prompt=0, drop_p=0.1, training=True):
    """The adapted model of RevisitingCIL, per PEFT kind:
    - adapter: convs/vision_transformer_adapter.py:165-183 (Block.forward, `ffn_option="parallel"`) with the
      Adapter of lines 70-90 (no layer norm: utils/inc_net.py:104 `ffn_adapter_layernorm_option="none"`; ReLU,
      dropout 0.1 (line 159), scale 0.1 (utils/inc_net.py:106)); the adapter reads the post-attention stream x;
    - ssf: convs/vision_transformer_ssf.py: patch tokens (366-367), norm1 (254), qkv (199), proj (210-211),
      norm2 (255), fc1 (159-160), fc2 (165-166), final norm (533-535);
    - vpt_deep / vpt_shallow: convs/vpt.py:108-135: prompts appended after the patch tokens (deep: a new set
      before every block, the block's prompt outputs cut off; shallow: once, cut off after the last block);
    - finetune: the plain ViT with every weight trained."""
    eps, heads = geo["eps"], geo["heads"]
    if kind == "ssf":
        x = embed(x, W, geo, ssf=(P["pe.scale"], P["pe.shift"]))
    else:
        x = embed(x, W, geo)
    n = x.shape[1]
    if kind == "vpt_shallow":
        x = torch.cat([x, P["prompts"].expand(x.shape[0], -1, -1)], dim=1)
    for i in range(geo["depth"]):
        if kind == "vpt_deep":
            x = torch.cat([x, P[f"prompts.{i}"].expand(x.shape[0], -1, -1)], dim=1)
        if kind == "ssf":
            s = {k: (P[f"{i}.{k}.scale"], P[f"{i}.{k}.shift"]) for k in ("norm1", "qkv", "proj", "norm2", "fc1", "fc2")}
            h = ln(x, W[f"blocks.{i}.norm1.weight"], W[f"blocks.{i}.norm1.bias"], eps)
            x = x + attention(h * s["norm1"][0] + s["norm1"][1], W, i, heads, ssf=s)
            h = ln(x, W[f"blocks.{i}.norm2.weight"], W[f"blocks.{i}.norm2.bias"], eps)
            x = x + mlp(h * s["norm2"][0] + s["norm2"][1], W, i, ssf=s)
        elif kind == "adapter":
            x = x + attention(ln(x, W[f"blocks.{i}.norm1.weight"], W[f"blocks.{i}.norm1.bias"], eps), W, i, heads)
            down = F.relu(F.linear(x, P[f"{i}.down.weight"], P[f"{i}.down.bias"]))
            down = F.dropout(down, p=drop_p, training=training)
            adapt = F.linear(down, P[f"{i}.up.weight"], P[f"{i}.up.bias"]) * 0.1
            x = x + mlp(ln(x, W[f"blocks.{i}.norm2.weight"], W[f"blocks.{i}.norm2.bias"], eps), W, i) + adapt
        else:
            x = plain_block(x, W, i, geo)
        if kind == "vpt_deep":
            x = x[:, :n]
    if kind == "vpt_shallow":
        x = x[:, :n]
    x = ln(x, W["norm.weight"], W["norm.bias"], eps)
    if kind == "ssf":
        x = x * P["norm.scale"] + P["norm.shift"]
    return x[:, 0]


def aper_peft_tensors(s, kind) -> dict[str, torch.Tensor]:
    """The strategy's PEFT parameters under the re-statement's names (read, not computed)."""
    vit = s.adapted.model
    out = {}
    if kind == "adapter":
        for i, blk in enumerate(vit.blocks):
            a = blk.mlp_adapter
            out.update({f"{i}.down.weight": a.down.weight, f"{i}.down.bias": a.down.bias,
                        f"{i}.up.weight": a.up.weight, f"{i}.up.bias": a.up.bias})
    elif kind == "ssf":
        out["pe.scale"], out["pe.shift"] = vit.patch_embed.proj.ssf.scale, vit.patch_embed.proj.ssf.shift
        for i, blk in enumerate(vit.blocks):
            for k, mod in (("norm1", blk.norm1), ("qkv", blk.attn.qkv), ("proj", blk.attn.proj),
                           ("norm2", blk.norm2), ("fc1", blk.mlp.fc1), ("fc2", blk.mlp.fc2)):
                out[f"{i}.{k}.scale"], out[f"{i}.{k}.shift"] = mod.ssf.scale, mod.ssf.shift
        out["norm.scale"], out["norm.shift"] = vit.norm.ssf.scale, vit.norm.ssf.shift
    elif kind == "vpt_deep":
        for i, blk in enumerate(vit.blocks):
            out[f"prompts.{i}"] = blk.prompts.tokens
    elif kind == "vpt_shallow":
        out["prompts"] = vit.blocks[0].prompts.tokens
    return out


def ref_cosine(feat, weight):
    """RevisitingCIL convs/linears.py CosineLinear.forward: normalise both, linear; sigma applied by the caller."""
    return F.linear(F.normalize(feat, p=2, dim=1), F.normalize(weight, p=2, dim=1))


@pytest.mark.parametrize("kind", ["adapter", "ssf", "vpt_shallow", "vpt_deep", "finetune"])
def test_aper_first_stage_and_merged_prototype_classifier_match_revisitingcil(kind):
    cfg, stream, s, trainer = build("adam", f"strategy.peft={kind}")
    vit = s.adapted.model
    geo = vit_geometry(vit)
    W0 = ptm_weights(s.backbone.model)  # the frozen PTM (APER's first branch), also the adapted copy's start
    exp0 = stream[0]
    cls0 = list(exp0.classes)

    # the init the reference draws (defect 5): SSF scale ~ N(1, .02), shift ~ N(0, .02); zero VPT prompts
    peft0 = {k: v.detach().clone() for k, v in aper_peft_tensors(s, kind).items()}
    if kind == "ssf":
        scales = torch.cat([v.flatten() for k, v in peft0.items() if k.endswith("scale")])
        shifts = torch.cat([v.flatten() for k, v in peft0.items() if k.endswith("shift")])
        assert 0.01 < (scales - 1).std() < 0.03 and 0.01 < shifts.std() < 0.03  # vision_transformer_ssf.py:378-385
    if kind.startswith("vpt"):
        assert all(float(v.abs().max()) == 0 for v in peft0.values())  # convs/vpt.py:49-52

    # strategy side: the trainer's own optimiser over what begin_experience hands it, the trainer's step order
    s.observe_classes(exp0)
    groups = normalize_groups(s.begin_experience(exp0))
    opt = trainer._make_optimizer(s, groups)
    c = trainer.cfg

    # reference side (models/aper_*.py `_train`, `_init_train`): SimpleVitNet = adapted ViT + CosineLinear with a
    # learnable sigma over the init_cls classes; SGD(momentum .9, weight_decay) over all network parameters
    # (frozen ones have no grad), CE on labels 0..init_cls-1.
    Wt = leaves(W0) if kind == "finetune" else W0
    P = leaves(peft0)
    head_w = s.first_head.weight.detach()[cls0].clone().requires_grad_(True)
    sigma = s.first_head.sigma.detach().clone().requires_grad_(True)
    ref_params = list(P.values()) + (list(Wt.values()) if kind == "finetune" else []) + [head_w, sigma]
    ref_opt = torch.optim.SGD(ref_params, lr=c.lr, momentum=0.9, weight_decay=c.weight_decay)
    pos = {k: j for j, k in enumerate(cls0)}

    steps = batches(exp0, 3, 8)
    for step, (x, y) in enumerate(steps):
        s.train()
        torch.manual_seed(100 + step)  # the adapter's dropout draws the same masks on both sides
        loss = s.train_step(Batch(x, y, None))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        s.before_optimizer_step()
        got_grads = {k: v.grad.clone() for k, v in aper_peft_tensors(s, kind).items()}
        got_head = s.first_head.weight.grad[cls0].clone()
        opt.step()
        s.after_optimizer_step()

        torch.manual_seed(100 + step)
        feat = aper_adapted_forward(x, Wt, P, kind, geo, training=True)
        ref_loss = F.cross_entropy(sigma * ref_cosine(feat, head_w), torch.tensor([pos[int(t)] for t in y]))
        ref_opt.zero_grad()
        ref_loss.backward()
        assert_close(loss.detach(), ref_loss.detach(), f"{kind} loss, step {step}")
        if step == 0:
            for k, g in got_grads.items():
                assert_close(g, P[k].grad, f"{kind} grad {k}")
            assert_close(got_head, head_w.grad, f"{kind} head grad")
            if kind == "finetune":
                sw = s.adapted.model.blocks[1].attn.qkv.weight.grad
                assert_close(sw, Wt["blocks.1.attn.qkv.weight"].grad, "finetune grad qkv")
        ref_opt.step()
    for k, v in aper_peft_tensors(s, kind).items():
        assert_close(v.detach(), P[k].detach(), f"{kind} {k} after 3 steps")
    assert_close(s.first_head.sigma.detach(), sigma.detach(), f"{kind} sigma after 3 steps")
    assert_close(s.first_head.weight.detach()[cls0], head_w.detach(), f"{kind} head after 3 steps")
    if kind == "finetune":
        got = dict(s.adapted.model.named_parameters())
        for k in ("blocks.0.mlp.fc1.weight", "cls_token", "norm.weight"):
            assert_close(got[k].detach(), Wt[k].detach(), f"finetune {k} after 3 steps")

    # merge (MultiBranchCosineIncrementalNet, utils/inc_net.py:573-652): [frozen PTM, adapted] features; the
    # prototype of each new class is the mean feature of its training images (replace_fc, eval mode), at every
    # stage; the classifier is CosineLinear with sigma 1. Evaluated with the trained tensors (checked above).
    P_now = {k: v.detach().clone() for k, v in aper_peft_tensors(s, kind).items()}
    W_adapted = ({k: v.detach().clone() for k, v in s.adapted.model.state_dict().items() if k in W0}
                 if kind == "finetune" else W0)
    s.eval()

    def ref_features(x):
        return torch.cat([ref_ptm(x, W0, geo), aper_adapted_forward(x, W_adapted, P_now, kind, geo, training=False)],
                         dim=1)

    s.end_experience(exp0, None)
    protos = {}
    for e in (0, 1):
        exp = stream[e]
        if e == 1:
            s.observe_classes(exp)
            assert s.begin_experience(exp) == []  # the adapter is never trained again
            s.end_experience(exp, None)
        xs, ys = images(exp)
        f = ref_features(xs)
        for cl in exp.classes:
            protos[cl] = f[ys == cl].mean(0)
            assert_close(s.prototypes[cl], protos[cl], f"{kind} prototype of class {cl}")
    seen = sorted(protos)
    xt = torch.cat([images(stream[0], 6)[0], images(stream[1], 6)[0]])
    ref_scores = ref_cosine(ref_features(xt), torch.stack([protos[k] for k in seen]))
    got = s.predict(xt)[:, seen]
    assert_close(got, ref_scores, f"{kind} merged cosine scores")
    assert torch.equal(got.argmax(1), ref_scores.argmax(1))


def test_simplecil_prototypes_and_cosine_classifier_match_revisitingcil():
    """models/simplecil.py:_train -> replace_fc (the same as aper_ssf.py:40-62): the prototype of each new class
    is the mean un-normalised PTM feature of its training images; utils/inc_net.py SimpleVitNet.forward ->
    CosineLinear (sigma 1): cosine between the feature and the prototypes."""
    cfg, stream, s, trainer = build("simplecil")
    geo = vit_geometry(s.backbone.model)
    W = ptm_weights(s.backbone.model)
    protos = {}
    for e in (0, 1, 2):
        exp = stream[e]
        s.observe_classes(exp)
        s.begin_experience(exp)
        s.fit_experience(exp, None, torch.device("cpu"))
        s.end_experience(exp, None)
        xs, ys = images(exp)
        f = ref_ptm(xs, W, geo)
        for cl in exp.classes:
            protos[cl] = f[ys == cl].mean(0)
            assert_close(s.prototypes[cl], protos[cl], f"prototype of class {cl}")
    seen = sorted(protos)
    xt = torch.cat([images(stream[e], 5)[0] for e in (0, 1, 2)])
    ref_scores = ref_cosine(ref_ptm(xt, W, geo), torch.stack([protos[k] for k in seen]))
    got = s.predict(xt)[:, seen]
    assert_close(got, ref_scores, "cosine scores")
    assert torch.equal(got.argmax(1), ref_scores.argmax(1))


# ----------------------------------------------------------------------------------------------------------
# LAE (gqk/LAE)
# ----------------------------------------------------------------------------------------------------------
def lae_forward(x, W, P, pet, geo, blocks):
    """LAE's ViT (libml/model/backbone/vit.py:333-408) with the online or offline PET tensors P (named as the
    strategy's backbone parameters, `model.blocks.<i>...`) attached to `blocks` (main.py:150-164):
    - Adapter (libml/model/pet/adapter.py:29-50, mode "parallel", Scaler(None) = learnable scalar init 1) on the
      block's attention: attn(norm1 x) + scale * up(gelu(down(norm1 x))) (vit.py:401-404);
    - KVLoRA (libml/model/pet/lora.py:78-84) on qkv: W_qkv + [0; s_k B_k A_k; s_v B_v A_v];
    - Prefix (libml/model/pet/prefix.py, prompt.py:34-41, position 1): scaled key/value tokens inserted after
      the CLS key/value; after softmax the prefix columns are divided by their sum (compensate, prefix.py:34-46,
      applied at vit.py:355).
    Returns the CLS token after the final norm (AvgToken(0, 1), libml/model/__init__.py:70-73)."""
    eps, heads = geo["eps"], geo["heads"]
    x = embed(x, W, geo)
    for i in range(geo["depth"]):
        pre = f"model.blocks.{i}."
        h = ln(x, W[f"blocks.{i}.norm1.weight"], W[f"blocks.{i}.norm1.bias"], eps)
        if i in blocks and pet == "adapter":
            a = attention(h, W, i, heads)
            z = F.gelu(F.linear(h, P[pre + "attn_adapter.down.weight"], P[pre + "attn_adapter.down.bias"]))
            a = a + F.linear(z, P[pre + "attn_adapter.up.weight"], P[pre + "attn_adapter.up.bias"]) * P[
                pre + "attn_adapter.scale"]
        elif i in blocks and pet == "lora":
            A, B, sc = P[pre + "attn.qkv.lora_A"], P[pre + "attn.qkv.lora_B"], P[pre + "attn.qkv.scaling"]
            w = W[f"blocks.{i}.attn.qkv.weight"]
            C = w.shape[1]
            delta = torch.cat([w.new_zeros(C, C), (B[0] @ A[0]) * sc[0], (B[1] @ A[1]) * sc[1]], dim=0)
            a = attention(h, W, i, heads, qkv_weight=w + delta)
        elif i in blocks and pet == "prefix":
            kt = P[pre + "prefix.key"] * P[pre + "prefix.key_scale"]
            vt = P[pre + "prefix.value"] * P[pre + "prefix.value_scale"]
            L = kt.shape[0]

            def prefix(k, v, kt=kt, vt=vt, L=L):
                k = torch.cat([k[:, :1], kt.expand(k.shape[0], -1, -1), k[:, 1:]], dim=1)
                v = torch.cat([v[:, :1], vt.expand(v.shape[0], -1, -1), v[:, 1:]], dim=1)

                def compensate(att):
                    lam = att[..., 1:1 + L].sum(-1, keepdim=True).clamp(min=1e-12)
                    return torch.cat([att[..., :1], att[..., 1:1 + L] / lam, att[..., 1 + L:]], dim=-1)
                return k, v, compensate
            a = attention(h, W, i, heads, prefix=prefix)
        else:
            a = attention(h, W, i, heads)
        x = x + a
        x = x + mlp(ln(x, W[f"blocks.{i}.norm2.weight"], W[f"blocks.{i}.norm2.bias"], eps), W, i)
    return final_cls(x, W, geo)


def lae_step(s, opt, x, y):
    """One step in the trainer's order (cl/engine/trainer.py `_train_sgd`)."""
    s.train()
    loss = s.train_step(Batch(x, y, None))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    s.before_optimizer_step()
    grads = {n: (p.grad.clone() if p.grad is not None else None) for n, p in zip(s.pet_names, s.pet_params)}
    opt.step()
    s.after_optimizer_step()
    return loss.detach(), grads


@pytest.mark.parametrize("pet", ["adapter", "lora", "prefix"])
def test_lae_online_offline_ema_and_ensemble_match_gqk_lae(pet):
    decay = 0.9  # the reference's 0.9999 leaves the offline PET indistinguishable from its copy in a few steps
    cfg, stream, s, trainer = build("lae", f"strategy.pet={pet}", f"strategy.ema_decay={decay}",
                                    "strategy.num_freeze_epochs=1")
    # float64 on both sides: Adam divides each gradient element by its own magnitude, so fp32 rounding of
    # near-zero elements (~1e-7 absolute, attention kernels differ) would move parameters by a fraction of lr
    s.double()
    vit = s.backbone.model
    geo = vit_geometry(vit)
    W = ptm_weights(vit)
    blocks = set(s.blocks)
    c = trainer.cfg
    assert c.optimizer == "adam"

    def ref_adam(params):  # libml/optim/optimizer.py:19-28: torch Adam over model.head and the pets
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)

    # --- task 0: online PET + head 0 (DynamicSimpleHead, Linear N(0, .001) / 0: head/simple.py:53-59)
    exp0 = stream[0]
    s.observe_classes(exp0)
    opt = trainer._make_optimizer(s, normalize_groups(s.begin_experience(exp0)))
    s.begin_epoch(0, 1)
    P = leaves(dict(zip(s.pet_names, s.pet_params)))
    heads = [(s.heads[0].weight.detach().clone().requires_grad_(True),
              s.heads[0].bias.detach().clone().requires_grad_(True))]
    ropt = ref_adam(list(P.values()) + [t for h in heads for t in h])
    order = list(exp0.classes)  # arrival order = the reference's relabelled class ids

    def ref_logits(feat):
        return torch.cat([F.linear(feat, w, b) for w, b in heads], dim=1)

    def ref_train_step(x, y, n_old, params):  # main.py:196-206: CE on output[:, num_old_classes:]
        out = ref_logits(lae_forward(x, W, params, pet, geo, blocks))
        t = torch.tensor([order.index(int(v)) for v in y])
        return F.cross_entropy(out[:, n_old:], t - n_old)

    for step, (x, y) in enumerate(batches(exp0, 3, 8)):
        x = x.double()
        loss, grads = lae_step(s, opt, x, y)
        ref = ref_train_step(x, y, 0, P)
        ropt.zero_grad()
        ref.backward()
        assert_close(loss.double(), ref.detach(), f"{pet} task-0 loss, step {step}")
        if step == 0:
            for n, g in grads.items():
                assert_close(g, P[n].grad, f"{pet} task-0 grad {n}")
            assert_close(s.heads[0].weight.grad, heads[0][0].grad, f"{pet} head 0 grad")
        ropt.step()
    for n, p in zip(s.pet_names, s.pet_params):
        assert_close(p.detach(), P[n].detach(), f"{pet} task-0 {n} after 3 steps")
    assert_close(s.heads[0].weight.detach(), heads[0][0].detach(), f"{pet} head 0 after 3 steps")
    s.end_experience(exp0, None)

    # --- task 1: offline PET = ModelEmaV2 copy of the task-0 online PET (main.py:61-64); a new head; the online
    # PET frozen during the first num_freeze_epochs epochs (main.py:182-194, utils.py freeze: grad None);
    # after every step the EMA update (main.py:208-213; timm ModelEmaV2: ema * decay + (1 - decay) * online).
    exp1 = stream[1]
    s.observe_classes(exp1)
    opt = trainer._make_optimizer(s, normalize_groups(s.begin_experience(exp1)))
    n_old = len(order)
    order += list(exp1.classes)
    heads.append((s.heads[1].weight.detach().clone().requires_grad_(True),
                  s.heads[1].bias.detach().clone().requires_grad_(True)))
    E = {n: v.detach().clone() for n, v in P.items()}  # the offline PET
    ropt = ref_adam(list(P.values()) + [t for h in heads for t in h])  # a new optimiser per task (module.py:64)
    data = batches(exp1, 4, 8, seed=2)
    for epoch in range(2):
        s.begin_epoch(epoch, 2)
        frozen = epoch < 1
        for step, (x, y) in enumerate(data[2 * epoch: 2 * epoch + 2]):
            x = x.double()
            loss, grads = lae_step(s, opt, x, y)
            params = {n: v.detach() for n, v in P.items()} if frozen else P
            ref = ref_train_step(x, y, n_old, params)
            ropt.zero_grad()
            ref.backward()
            assert_close(loss.double(), ref.detach(), f"{pet} task-1 loss, epoch {epoch} step {step}")
            if not frozen and step == 0:
                for n, g in grads.items():
                    assert_close(g, P[n].grad, f"{pet} task-1 grad {n}")
            if frozen:
                assert all(g is None for g in grads.values())
            ropt.step()
            with torch.no_grad():
                for n in E:
                    E[n] = E[n] * decay + (1.0 - decay) * P[n]
    for n, p in zip(s.pet_names, s.pet_params):
        assert_close(p.detach(), P[n].detach(), f"{pet} task-1 online {n}")
        assert_close(s.ema.offline[n].detach(), E[n], f"{pet} task-1 offline {n}")
    assert_close(s.heads[0].weight.detach(), heads[0][0].detach(), "old head unchanged by Adam")
    assert_close(s.heads[1].weight.detach(), heads[1][0].detach(), f"{pet} head 1")
    s.end_experience(exp1, None)

    # --- inference (main.py:215-250): max over softmax(online), softmax(offline) over all heads
    s.eval()
    xt = torch.cat([images(stream[0], 6)[0], images(stream[1], 6)[0]]).double()
    with torch.no_grad():
        p_on = ref_logits(lae_forward(xt, W, P, pet, geo, blocks)).softmax(1)
        p_off = ref_logits(lae_forward(xt, W, E, pet, geo, blocks)).softmax(1)
        ref = torch.stack([p_on, p_off], dim=-1).max(dim=-1)[0]
    got = s.predict(xt)[:, order]
    assert_close(got, ref.float(), f"{pet} ensemble")
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert not torch.allclose(p_on, p_off)  # the two members differ: the max is a real ensemble here


# ----------------------------------------------------------------------------------------------------------
# SEMA (huiyiwang01/SEMA-CL)
# ----------------------------------------------------------------------------------------------------------
def sema_tensors(s) -> dict[str, torch.Tensor]:
    """The strategy's SEMA tensors under the re-statement's names: `<block>.<adapter>.{down,up}.{weight,bias}`,
    `<block>.<adapter>.router.{weight,bias}`, `<block>.<adapter>.{enc,dec}.{weight,bias}`, `fc.{weight,bias}`."""
    out = {"fc.weight": s.head.weight, "fc.bias": s.head.bias}
    for i, blk in enumerate(s.blocks):
        m = blk.mlp_adapter
        adapters = m.adapters if hasattr(m, "adapters") else [m]
        for j, a in enumerate(adapters):
            out.update({f"{i}.{j}.down.weight": a.down.weight, f"{i}.{j}.down.bias": a.down.bias,
                        f"{i}.{j}.up.weight": a.up.weight, f"{i}.{j}.up.bias": a.up.bias})
        if hasattr(m, "adapters"):
            for j, (r, rd) in enumerate(zip(m.router, m.rds)):
                out.update({f"{i}.{j}.router.weight": r.weight, f"{i}.{j}.router.bias": r.bias,
                            f"{i}.{j}.enc.weight": rd.encoder.weight, f"{i}.{j}.enc.bias": rd.encoder.bias,
                            f"{i}.{j}.dec.weight": rd.decoder.weight, f"{i}.{j}.dec.bias": rd.decoder.bias})
    return out


def sema_forward(x, W, T, geo, expandable, n_adapters):
    """SEMA's ViT (backbone/vit_sema.py:86-106, forward_features 206-240) with SEMAModules
    (backbone/sema_block.py:108-149) parallel to the MLP, fed the post-attention stream x:
    non-expandable blocks: the one functional adapter (sema_block.py:113-114);
    expandable blocks: sum_j softmax_j(router(mean_tokens x)) * adapter_j(x) (137-142), the router being the
    old columns concatenated with the new one (fix_router, 83-95);
    adapter (sema_components.py:46-53): up(relu(down(x))), no scale, no dropout, no layer norm
    (utils/inc_net.py:73 `ffn_adapter_layernorm_option="none"`).
    RD loss (sema_components.py:70-82): per sample, MSE(decoder(encoder(mean_tokens x)), mean_tokens x).
    Returns (CLS feature after the final norm, {block: [per-sample RD loss of adapter j]})."""
    eps, heads = geo["eps"], geo["heads"]
    x = embed(x, W, geo)
    rd = {}
    for i in range(geo["depth"]):
        x = x + attention(ln(x, W[f"blocks.{i}.norm1.weight"], W[f"blocks.{i}.norm1.bias"], eps), W, i, heads)

        def adapter(j):
            z = F.relu(F.linear(x, T[f"{i}.{j}.down.weight"], T[f"{i}.{j}.down.bias"]))
            return F.linear(z, T[f"{i}.{j}.up.weight"], T[f"{i}.{j}.up.bias"])
        if i in expandable:
            xm = x.mean(dim=1)
            logits = torch.cat([F.linear(xm, T[f"{i}.{j}.router.weight"], T[f"{i}.{j}.router.bias"])
                                for j in range(n_adapters[i])], dim=1)
            mask = torch.softmax(logits, dim=1)
            ad = (torch.stack([adapter(j) for j in range(n_adapters[i])]) * mask.T[:, :, None, None]).sum(0)
            rd[i] = [F.mse_loss(F.linear(F.linear(xm, T[f"{i}.{j}.enc.weight"], T[f"{i}.{j}.enc.bias"]),
                                         T[f"{i}.{j}.dec.weight"], T[f"{i}.{j}.dec.bias"]), xm, reduction="none"
                                ).mean(-1) for j in range(n_adapters[i])]
        else:
            ad = adapter(0)
        x = x + mlp(ln(x, W[f"blocks.{i}.norm2.weight"], W[f"blocks.{i}.norm2.bias"], eps), W, i) + ad
    return final_cls(x, W, geo), rd


class RefRecords:
    """backbone/sema_components.py:93-130 (`Records`): fill up to max_len (the overflow of the batch that fills
    it is dropped), then keep the newest max_len; mean and unbiased variance of the kept values."""

    def __init__(self, max_len):
        self.max_len, self.rec = max_len, torch.zeros(0)

    def add(self, v):
        v = v.detach().flatten()
        if len(self.rec) < self.max_len:
            self.rec = torch.cat([self.rec, v[: self.max_len - len(self.rec)]])
        else:
            self.rec = torch.cat([self.rec, v])[len(v):]

    def z(self, loss):  # sema_block.py:44-50
        if not len(self.rec) > 2:
            return torch.zeros_like(loss)
        return ((loss - self.rec.mean()) / self.rec.var().sqrt()).abs()


def spy_optimizer(s):
    """Records, at every optimiser step of the strategy's own loops, the gradients about to be applied."""
    seen = []
    make = s._optimizer

    def wrapped(params, lr, epochs):
        opt, sched = make(params, lr, epochs)
        opt.register_step_pre_hook(lambda o, a, k: seen.append(
            {id(p): p.grad.clone() for g in o.param_groups for p in g["params"] if p.grad is not None}))
        return opt, sched
    s._optimizer = wrapped
    return seen


def test_sema_adapter_router_rd_detection_and_expansion_match_sema_cl():
    buffer = 20  # < the RD phase's 3 batches x 8 losses, so the reference's and clbench's buffers hold the same
    cfg, stream, s, trainer = build("sema", "strategy.rd_dim=16", f"strategy.buffer_size={buffer}",
                                    "strategy.detect_batch_size=8", "strategy.rd_epoch=1", "trainer.epochs=1")
    vit = s.backbone.model
    geo = vit_geometry(vit)
    W = ptm_weights(vit)
    h = s.h
    expandable = list(s.expandable)
    n_ad = {i: 1 for i in range(geo["depth"])}
    grads_seen = spy_optimizer(s)
    logits_seen = []
    s.head.register_forward_hook(lambda m, a, out: logits_seen.append(out.detach().clone()))
    dev = torch.device("cpu")

    def sgd(params, lr):  # models/sema.py:205-225: SGD(momentum .9, weight_decay), cosine over the phase's epochs
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=h["weight_decay"])

    def ce(logits, y, current):  # models/sema.py:133-139: logits[:, :total]; old ones -inf; CE
        mask = torch.zeros(logits.shape[1], dtype=torch.bool)
        mask[current] = True
        return F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y)

    # --- task 0, functional phase (models/sema.py:89-91): every functional adapter, the routers, fc
    exp0 = stream[0]
    s.observe_classes(exp0)
    s.begin_experience(exp0)
    s._trained = {}  # what fit_experience sets up before its phases (the test drives the phases one by one)
    T = leaves(sema_tensors(s))
    names0 = [k for k in T if k.startswith("fc.") or ".down." in k or ".up." in k or ".router." in k]
    ropt = sgd([T[k] for k in names0], h["func_lr"])
    recs = {i: [RefRecords(buffer)] for i in expandable}
    data = batches(exp0, 3, 8)
    s._train_functional(data, dev, s._first_task_functional(), "func")
    live = sema_tensors(s)
    for step, (x, y) in enumerate(data):
        feat, rd = sema_forward(x, W, T, geo, expandable, n_ad)
        logits = F.linear(feat, T["fc.weight"], T["fc.bias"])
        assert_close(logits_seen[step], logits.detach(), f"task-0 logits, step {step}")
        loss = ce(logits, y, list(exp0.classes))
        ropt.zero_grad()
        loss.backward()
        for i in expandable:  # sema_block.py:40-41: training forwards record the (untrained) RD's losses too
            recs[i][0].add(rd[i][0])
        if step == 0:
            for k in names0:
                assert_close(grads_seen[step][id(live[k])], T[k].grad, f"task-0 grad {k}")
        ropt.step()
    for k in names0:
        assert_close(live[k].detach(), T[k].detach(), f"task-0 {k} after 3 steps")

    # --- task 0, RD phase (models/sema.py:92-93, 140-142): the RDs of the expandable blocks on the sum over
    # blocks of their mean RD loss (vit_sema.py:225), SGD at rd_lr
    logits_seen.clear()
    n_func = len(grads_seen)
    names_rd = [k for k in T if ".enc." in k or ".dec." in k]
    ropt = sgd([T[k] for k in names_rd], h["rd_lr"])
    s._train_rd(data, dev, s.slots, [p for sl in s.slots for p in sl.rds[0].parameters()], "rd")
    fixed = {k: v.detach() for k, v in T.items() if k not in names_rd}
    for step, (x, _) in enumerate(data):
        _, rd = sema_forward(x, W, {**fixed, **{k: T[k] for k in names_rd}}, geo, expandable, n_ad)
        loss = sum(rd[i][0].mean() for i in expandable)
        ropt.zero_grad()
        loss.backward()
        for i in expandable:
            recs[i][0].add(rd[i][0])
        if step == 0:
            for k in names_rd:
                assert_close(grads_seen[n_func + step][id(live[k])], T[k].grad, f"task-0 RD grad {k}")
        ropt.step()
    for k in names_rd:
        assert_close(live[k].detach(), T[k].detach(), f"task-0 RD {k} after 3 steps")
    for i, sl in zip(expandable, s.slots):
        got = sl.records[0, : int(sl.record_len[0])]
        assert_close(got, recs[i][0].rec, f"block {i} loss buffer")
    s.requires_grad_(False)
    s.end_experience(exp0, None)
    s.eval()

    # --- task 1, the expansion check (models/sema.py:95-121, sema_block.py:127-135): in block order, expand
    # the first block where min over adapters of mean over the batch of the z-score exceeds exp_threshold
    exp1 = stream[1]
    s.observe_classes(exp1)
    s.begin_experience(exp1)
    s._trained = {}
    T = {k: v.detach().clone() for k, v in sema_tensors(s).items()}
    xd = images(exp1, 8)[0]
    with torch.no_grad():
        _, rd = sema_forward(xd, W, T, geo, expandable, n_ad)
    stat = {i: min(float(recs[i][j].z(rd[i][j]).mean()) for j in range(n_ad[i])) for i in expandable}
    assert len(set(round(v, 3) for v in stat.values())) == len(stat)  # distinct, so the thresholds below separate
    for thr in sorted(stat.values()):
        for t in (thr - 1e-3, thr + 1e-3):
            h["exp_threshold"] = t
            want = next((i for i in expandable if stat[i] > t), None)
            assert s.detect(xd) == want, f"threshold {t}: z statistics {stat}"
    block = expandable[0]
    h["exp_threshold"] = stat[block] - 1e-3
    assert s.detect(xd) == block

    # --- the expansion: a new adapter, RD and router column at `block`, trained (adapter + new router column +
    # fc by CE over the task's classes, then the new RD), the old ones frozen (sema_block.py:98-106, 151-182)
    slot = s.expand(block)
    n_ad[block] = 2
    T = leaves(sema_tensors(s))
    new = [k for k in T if k.startswith(f"{block}.1.") and ".enc." not in k and ".dec." not in k]
    names1 = new + ["fc.weight", "fc.bias"]
    ropt = sgd([T[k] for k in names1], h["func_lr"])
    logits_seen.clear()
    start = len(grads_seen)
    s.requires_grad_(False)
    params = list(slot.adapters[-1].parameters()) + list(slot.router[-1].parameters()) + list(s.head.parameters())
    data1 = batches(exp1, 3, 8, seed=3)
    s._train_functional(data1, dev, params, "func 1")
    live = sema_tensors(s)
    frozen = {k: v.detach() for k, v in T.items() if k not in names1}
    for step, (x, y) in enumerate(data1):
        feat, _ = sema_forward(x, W, {**frozen, **{k: T[k] for k in names1}}, geo, expandable, n_ad)
        logits = F.linear(feat, T["fc.weight"], T["fc.bias"])
        assert_close(logits_seen[step], logits.detach(), f"expansion logits, step {step}")
        loss = ce(logits, y, list(exp1.classes))
        ropt.zero_grad()
        loss.backward()
        if step == 0:
            for k in names1:
                assert_close(grads_seen[start + step][id(live[k])], T[k].grad, f"expansion grad {k}")
        ropt.step()
    for k in names1:
        assert_close(live[k].detach(), T[k].detach(), f"expansion {k} after 3 steps")
    assert any(float(T[k].detach().abs().max()) > 0 for k in new if ".up." in k)  # the new adapter learnt

    # the new RD alone (its block's rd_loss; the others' adapters are not newly added: sema_block.py:143-146)
    names_rd = [f"{block}.1.{a}.{b}" for a in ("enc", "dec") for b in ("weight", "bias")]
    ropt = sgd([T[k] for k in names_rd], h["rd_lr"])
    start = len(grads_seen)
    s._train_rd(data1, dev, [slot], list(slot.rds[-1].parameters()), "rd 1")
    fixed = {k: v.detach() for k, v in T.items() if k not in names_rd}
    for step, (x, _) in enumerate(data1):
        _, rd = sema_forward(x, W, {**fixed, **{k: T[k] for k in names_rd}}, geo, expandable, n_ad)
        loss = rd[block][1].mean()
        ropt.zero_grad()
        loss.backward()
        if step == 0:
            for k in names_rd:
                assert_close(grads_seen[start + step][id(live[k])], T[k].grad, f"expansion RD grad {k}")
        ropt.step()
    for k in names_rd:
        assert_close(live[k].detach(), T[k].detach(), f"expansion RD {k} after 3 steps")
    s.requires_grad_(False)

    # --- inference (models/sema.py:170-187): one forward through the mixture, argmax over the seen classes
    s.eval()
    seen = sorted(list(exp0.classes) + list(exp1.classes))
    xt = torch.cat([images(stream[0], 6)[0], images(stream[1], 6)[0]])
    with torch.no_grad():
        feat, _ = sema_forward(xt, W, {k: v.detach() for k, v in T.items()}, geo, expandable, n_ad)
        ref = F.linear(feat, T["fc.weight"].detach(), T["fc.bias"].detach())[:, seen]
    got = s.predict(xt)[:, seen]
    assert_close(got, ref, "predictions")
    assert torch.equal(got.argmax(1), ref.argmax(1))

"""cl/models/peft.py: identity at init, exact block re-implementation, slot swapping, LoRA, prefix maths, VPT,
SSF/FiLM, gradient isolation and the reference parameter counts (ptm_cil.md section 4)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from cl.models import peft  # noqa: E402

pytestmark = pytest.mark.unit


def tiny_vit(seed: int = 0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=4,
                          embed_dim=128, depth=4, num_heads=4)
    # timm zero-inits some biases; randomise everything so identities are not trivially satisfied.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 32)


@pytest.fixture
def vit():
    return tiny_vit()


def same(a, b):
    return a.shape == b.shape and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- wrapping
def test_wrapped_blocks_equal_original_and_keep_state_dict_keys(vit, images):
    ref = vit(images)
    ref_tokens = vit.forward_features(images)
    keys = list(vit.state_dict())
    block_in = torch.randn(2, 65, 128)
    ref_block = vit.blocks[1](block_in)
    wrapped = peft.wrap_blocks(vit)
    assert all(isinstance(b, peft.PeftBlock) for b in vit.blocks) and len(wrapped) == 4
    assert list(vit.state_dict()) == keys
    assert same(vit.blocks[1](block_in), ref_block)
    assert (vit(images) - ref).abs().max() <= 1e-6
    assert same(vit(images), ref) and same(vit.forward_features(images), ref_tokens)


def test_wrap_is_idempotent_and_takes_negative_indices(vit):
    a = peft.wrap_blocks(vit, [-1, 0])
    assert a[0] is vit.blocks[3] and a[1] is vit.blocks[0]
    assert not isinstance(vit.blocks[1], peft.PeftBlock)
    b = peft.wrap_blocks(vit, [0, 3])
    assert b[0] is a[1] and b[1] is a[0]
    with pytest.raises(IndexError):
        peft.wrap_blocks(vit, [4])


def test_accepts_backbone(vit, images):
    from cl.models.backbones import Backbone

    bb = Backbone(vit, name="t", arch="t", feature_dim=128, input_size=32, in_chans=3, normalize="none",
                  weights_id="x", pretrained=False)
    ads = peft.add_adapters(bb, bottleneck=4)
    assert len(ads) == 4 and isinstance(vit.blocks[0], peft.PeftBlock)


# ---------------------------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("position", ["parallel", "sequential"])
def test_adapters_identity_at_init_then_active(vit, images, position):
    ref = vit(images)
    ads = peft.add_adapters(vit, position=position, bottleneck=8, layernorm="in")
    assert same(vit(images), ref)
    with torch.no_grad():
        for a in ads:
            a.up.weight.normal_(std=0.1)
    assert not torch.allclose(vit(images), ref)


def test_parallel_adapter_matches_the_reference_formula(vit):
    blk0 = copy.deepcopy(vit.blocks[0])
    (ad,) = peft.add_adapters(vit, blocks=[0], bottleneck=8, scale=0.1)
    with torch.no_grad():
        ad.up.weight.normal_(std=0.1)
        ad.up.bias.normal_(std=0.1)
    x = torch.randn(2, 65, 128)
    x1 = x + blk0.attn(blk0.norm1(x))
    mlp = blk0.mlp(blk0.norm2(x1))
    adapt = ad.up(torch.relu(ad.down(x1))) * 0.1  # fed the post-attention residual stream, not normed
    torch.testing.assert_close(vit.blocks[0](x), x1 + mlp + adapt, atol=1e-6, rtol=0)


def test_attn_adapter_identity_then_lae_formula(vit, images):
    ref = vit(images)
    blk0 = copy.deepcopy(vit.blocks[0])
    ads = peft.add_attn_adapters(vit, range(2), bottleneck=5, act="gelu", dropout=0.0, scale=1.0,
                                 scale_learnable=True)
    assert same(vit(images), ref)
    assert peft.count_params(ads[0]) == 128 * 5 + 5 + 5 * 128 + 128 + 1
    with torch.no_grad():
        ads[0].up.weight.normal_(std=0.1)
        ads[0].scale.fill_(0.5)
    x = torch.randn(2, 65, 128)
    h = blk0.norm1(x)
    x1 = x + blk0.attn(h) + 0.5 * ads[0].up(F.gelu(ads[0].down(h)))
    torch.testing.assert_close(vit.blocks[0](x), x1 + blk0.mlp(blk0.norm2(x1)), atol=1e-6, rtol=0)


def test_adapter_init_and_param_count():
    a = peft.Adapter(768, bottleneck=16)
    assert peft.count_params(a) == 768 * 16 + 16 + 16 * 768 + 768
    assert torch.all(a.up.weight == 0) and torch.all(a.up.bias == 0) and torch.all(a.down.bias == 0)
    bound = 1 / 768 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 768
    assert a.down.weight.abs().max() <= bound and a.down.weight.std() > bound / 4
    assert torch.equal(a(torch.randn(3, 768)), torch.zeros(3, 768))


def test_swapping_mlp_adapters_changes_and_restores(vit, images):
    first = peft.add_adapters(vit, bottleneck=8)
    second = copy.deepcopy(first)
    with torch.no_grad():
        for a in first:
            a.up.weight.normal_(std=0.1)
        for a in second:
            a.up.weight.normal_(std=0.1)
    out1 = vit(images)
    peft.set_mlp_adapters(vit, second)
    assert peft.get_mlp_adapters(vit) == list(second)
    out2 = vit(images)
    assert not torch.allclose(out1, out2)
    for blk, a in zip(vit.blocks, first):  # MOS-style manual assignment
        blk.mlp_adapter = a
    assert same(vit(images), out1)
    peft.set_mlp_adapters(vit, [None] * 4)
    assert same(vit(images), tiny_vit()(images))


def test_freeze_except_peft_gradients_reach_only_peft(vit, images):
    peft.add_adapters(vit, bottleneck=4)
    peft.add_lora(vit, blocks=[1], rank=2, where=("qkv", "fc1"))
    peft.add_prefix(vit, blocks=[2], n_tokens=3)
    peft.add_film_vit(vit, blocks=[3])
    params = peft.freeze_except_peft(vit)
    assert len(params) == 4 * 4 + 2 * 2 + 2 + 4  # adapters, LoRA A/B, prefix k/v, BlockFiLM
    ids = {id(p) for p in params}
    vit.train()
    vit(images).pow(2).sum().backward()
    for name, p in vit.named_parameters():
        if id(p) in ids:
            assert p.requires_grad
        else:
            assert not p.requires_grad and p.grad is None, name
    # the adapters' `down` is the only part with a zero gradient at init (`up` is zero)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert peft.count_params(vit, trainable_only=True) == peft.count_params(params)


# ---------------------------------------------------------------------------------------------- LoRA
def test_lora_identity_merge_and_delta(vit, images):
    ref = vit(images)
    loras = peft.add_lora(vit, rank=4, where=("qkv", "mlp.fc1", "fc2", "proj"), alpha=8)
    assert len(loras) == 16 and same(vit(images), ref)
    assert "blocks.0.attn.qkv.weight" in vit.state_dict()
    with pytest.raises(ValueError):
        peft.add_lora(vit, blocks=[0], rank=2)
    with torch.no_grad():
        for lo in loras:
            lo.lora_B.normal_(std=0.05)
    out = vit(images)
    assert not torch.allclose(out, ref)
    lo = loras[0]
    x = torch.randn(5, 128)
    torch.testing.assert_close(lo(x), F.linear(x, lo.weight + lo.delta_weight(), lo.bias), atol=1e-5, rtol=1e-5)
    assert lo.scaling == 2.0
    assert peft.merge_lora(vit) == 16
    assert all(torch.all(l.lora_B == 0) for l in loras)
    assert all(torch.all(l.delta_weight() == 0) for l in loras)
    torch.testing.assert_close(vit(images), out, atol=1e-5, rtol=1e-5)


def test_lora_kv_targets_leave_q_unchanged():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 48)
    ref = copy.deepcopy(base)
    lo = peft.LoRALinear(base, rank=2, targets=("v", "k"))
    assert lo.targets == ("k", "v") and lo.lora_A.shape == (2, 2, 16) and lo.lora_B.shape == (2, 16, 2)
    assert peft.count_params(lo.own_peft_parameters()) == 2 * (2 * 16 + 16 * 2)  # LAE KVLoRA: a pair per K, V
    assert not lo.weight.requires_grad
    x = torch.randn(3, 7, 16)
    assert same(lo(x), ref(x))
    with torch.no_grad():
        lo.lora_B.normal_()
    y, y0 = lo(x), ref(x)
    assert same(y[..., :16], y0[..., :16])
    assert not torch.allclose(y[..., 16:32], y0[..., 16:32]) and not torch.allclose(y[..., 32:], y0[..., 32:])
    dw = lo.delta_weight()
    assert dw.shape == (48, 16) and torch.all(dw[:16] == 0)
    torch.testing.assert_close(y, F.linear(x, lo.weight + dw, lo.bias), atol=1e-5, rtol=1e-5)
    lo.merge()
    torch.testing.assert_close(lo(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        peft.LoRALinear(torch.nn.Linear(16, 20), rank=2, targets=("k",))


# ---------------------------------------------------------------------------------------------- prefix
def _heads(attn, h):
    B, N, _ = h.shape
    q, k, v = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


def _finish(attn, o):
    B, H, N, d = o.shape
    return attn.proj(o.transpose(1, 2).reshape(B, N, H * d))


def test_prefix_zero_init_damps_attention_by_one_minus_lambda(vit):
    """The documented exception: a prefix is never an identity. With zero keys and values the attention
    output is exactly (1 - lambda) * Attn_tokens, lambda = n / (n + sum_j exp(s_j)), for both variants."""
    attn = vit.blocks[0].attn
    h = torch.randn(2, 65, 128)
    q, k, v = _heads(attn, h)
    s = (q * attn.scale) @ k.transpose(-2, -1)
    n = 3
    lam = n / (n + s.exp().sum(-1, keepdim=True))
    pre_attn = ((1 - lam) * (s.softmax(-1) @ v))
    expected = _finish(attn, pre_attn)
    for compensate in (True, False):
        pre = peft.Prefix(n, 128, 4, compensate=compensate, init="zeros")
        out = peft.prefix_attention(attn, h, pre)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out, attn(h))


@pytest.mark.parametrize("fused", [True, False])
def test_prefix_compensation_maths(vit, fused):
    attn = vit.blocks[0].attn
    attn.fused_attn = fused
    torch.manual_seed(3)
    n = 4
    pre = peft.Prefix(n, 128, 4, compensate=True, init="normal")
    with torch.no_grad():
        pre.key.normal_(std=0.5)
        pre.value.normal_(std=0.5)
    h = torch.randn(2, 65, 128)
    q, k, v = _heads(attn, h)
    pk, pv = pre.key_value()
    s_tok = (q * attn.scale) @ k.transpose(-2, -1)
    s_pre = (q * attn.scale) @ pk.transpose(-2, -1)
    lam = s_pre.exp().sum(-1, keepdim=True) / (s_pre.exp().sum(-1, keepdim=True) + s_tok.exp().sum(-1, keepdim=True))
    h_tok = s_tok.softmax(-1) @ v
    h_pre = s_pre.softmax(-1) @ pv
    # LAE compensation: (1 - lambda) * h_tok + h_pre ; plain prefix: (1 - lambda) * h_tok + lambda * h_pre
    torch.testing.assert_close(peft.prefix_attention(attn, h, pre), _finish(attn, (1 - lam) * h_tok + h_pre),
                               atol=1e-5, rtol=1e-5)
    pre.compensate = False
    plain = _finish(attn, (1 - lam) * h_tok + lam * h_pre)
    torch.testing.assert_close(peft.prefix_attention(attn, h, pre), plain, atol=1e-5, rtol=1e-5)


def test_add_prefix_counts_and_slot(vit, images):
    ref = vit(images)
    ps = peft.add_prefix(vit, blocks=range(2), n_tokens=10)
    assert peft.count_params(ps) == 2 * 2 * 10 * 128  # LAE: 5 * 2 * 10 * 768 = 76,800 on ViT-B
    assert torch.all((ps[0].key >= 0) & (ps[0].key <= 0.01))  # LAE's U(0, 0.01)
    out = vit(images)
    assert out.shape == ref.shape and not torch.allclose(out, ref)
    for b in vit.blocks:
        b.prefix = None
    assert same(vit(images), ref)


# ---------------------------------------------------------------------------------------------- VPT
@pytest.mark.parametrize("deep", [False, True])
def test_vpt_shape_cls_and_effect(vit, images, deep):
    ref_tokens = vit.forward_features(images)
    prompts = peft.add_vpt(vit, n_tokens=5, deep=deep, init="zeros")
    assert len(prompts) == (4 if deep else 1)
    tokens = vit.forward_features(images)
    assert tokens.shape == ref_tokens.shape
    assert same(vit(images), tokens[:, 0])  # the pooled feature is the CLS token
    with torch.no_grad():
        for p in prompts:
            p.tokens.normal_()
    out = vit.forward_features(images)
    assert out.shape == ref_tokens.shape and not torch.allclose(out[:, 0], tokens[:, 0])
    with pytest.raises(ValueError):
        peft.add_vpt(vit, n_tokens=2, deep=deep)


def test_vpt_deep_replaces_prompts_at_every_block(vit, images):
    orig = copy.deepcopy(vit)
    prompts = peft.add_vpt(vit, n_tokens=3, deep=True)  # default VPT xavier-uniform init, non-zero
    x = orig.norm_pre(orig.patch_drop(orig._pos_embed(orig.patch_embed(images))))
    for i, blk in enumerate(orig.blocks):
        tok = prompts[i].tokens.unsqueeze(0).expand(2, -1, -1)
        x = x if i == 0 else torch.cat([x[:, :1], x[:, 4:]], dim=1)  # drop previous block's prompt outputs
        x = blk(torch.cat([x[:, :1], tok, x[:, 1:]], dim=1))
    x = orig.norm(torch.cat([x[:, :1], x[:, 4:]], dim=1))
    torch.testing.assert_close(vit.forward_features(images), x, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- SSF / FiLM
def test_ssf_identity_placement_and_deepcopy(vit, images):
    ref = vit(images)
    peft.add_lora(vit, blocks=[0], rank=2)  # LoRA first, then SSF on top of it
    ssfs = peft.add_ssf(vit)
    assert len(ssfs) == 1 + 6 * 4 + 1
    assert same(vit(images), ref)
    assert "blocks.0.attn.qkv.ssf.scale" in vit.state_dict() and "patch_embed.proj.ssf.shift" in vit.state_dict()
    assert peft.count_params(ssfs) == 2 * (128 + 4 * (4 * 128 + 3 * 128 + 4 * 128) + 128)
    twin = copy.deepcopy(vit)
    with torch.no_grad():
        for s in ssfs:
            s.scale.normal_(1.0, 0.1)
    out = vit(images)
    assert not torch.allclose(out, ref)
    assert same(twin(images), ref)  # the copy's hooks use the copy's own SSF parameters
    with pytest.raises(ValueError):
        peft.add_ssf(vit)


def test_film_vit_identity(vit, images):
    ref = vit(images)
    films = peft.add_film_vit(vit, blocks=[0, -1])
    assert same(vit(images), ref)
    assert peft.count_params(films) == 2 * 2 * 2 * 128
    with torch.no_grad():
        films[0].norm2.beta.normal_()
    assert not torch.allclose(vit(images), ref)


@pytest.mark.e2e
@pytest.mark.parametrize("arch,kwargs", [
    ("resnet18", dict(channels=(16, 32, 64, 128), stem_width=16)),
    ("efficientnet_b0", {}),
])
def test_film_bn_identity_on_cnn(arch, kwargs):
    torch.manual_seed(0)
    m = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    n_bn = sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())
    m.train()
    with torch.no_grad():  # non-trivial running statistics
        m(torch.rand(4, 3, 32, 32))
    m.eval()
    x = torch.rand(2, 3, 32, 32)
    ref = m(x)
    films = peft.add_film_bn(m)
    assert len(films) == n_bn
    assert same(m(x), ref)
    peft.freeze_except_peft(m)
    assert peft.count_params(m, trainable_only=True) == 2 * sum(f.dim for f in films)
    with torch.no_grad():
        films[0].gamma.fill_(1.5)
    assert not torch.allclose(m(x), ref)


# ---------------------------------------------------------------------------------------------- counts
def test_reference_parameter_counts_on_vit_b():
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    base = peft.count_params(vit)
    mos = peft.add_adapters(vit, bottleneck=16)
    assert peft.count_params(mos) == 304_320 == 12 * (768 * 16 + 16 + 16 * 768 + 768)
    assert peft.count_params(vit) - base == 304_320
    aper = peft.add_adapters(vit, bottleneck=64)  # replaces the MOS adapters in the slots
    assert peft.count_params(aper) == 1_189_632
    assert peft.count_params(vit) - base == 1_189_632
    peft.freeze_except_peft(vit)
    assert peft.count_params(vit, trainable_only=True) == 1_189_632
    lae = peft.add_prefix(vit, blocks=range(5), n_tokens=10)
    assert peft.count_params(lae) == 76_800


def test_prefix_attention_masks(vit):
    attn = vit.blocks[0].attn
    pre = peft.Prefix(2, 128, 4)
    h = torch.randn(2, 9, 128)
    plain = peft.prefix_attention(attn, h, pre)
    assert same(peft.prefix_attention(attn, h, pre, attn_mask=torch.ones(9, 9, dtype=torch.bool)), plain)
    causal = peft.prefix_attention(attn, h, pre, is_causal=True)
    torch.testing.assert_close(causal[:, -1], plain[:, -1], atol=1e-5, rtol=1e-5)  # last query sees everything
    assert not torch.allclose(causal[:, 0], plain[:, 0])

"""The model of notes §2.1, checked against formulas and PyTorch's own ops."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmlab.config import ModelConfig, preset
from llmlab.model import GPT, KVCache, apply_rope, causal_mask, rope_tables, sinusoidal_table
from llmlab.static_decode import StaticKVCache
from tests.conftest import TINY_VARIANTS

VARIANTS = list(TINY_VARIANTS)


def build(name: str, **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(replace(TINY_VARIANTS[name], **overrides)).eval()


def test_sinusoidal_table_equals_the_formula():
    """Reference: PE(pos,2i) = sin(pos/10000^(2i/H)), PE(pos,2i+1) = cos(...), by plain loops."""
    S, H = 50, 16
    ref = np.zeros((S, H))
    for pos in range(S):
        for i in range(H // 2):
            ref[pos, 2 * i] = math.sin(pos / 10000 ** (2 * i / H))
            ref[pos, 2 * i + 1] = math.cos(pos / 10000 ** (2 * i / H))
    np.testing.assert_allclose(sinusoidal_table(S, H).numpy(), ref, atol=1e-6)


def test_sinusoidal_positions_are_a_buffer_not_a_parameter():
    model = build("notes")
    assert "pos_embed.table" not in dict(model.named_parameters())
    assert "pos_embed.table" not in model.state_dict()  # non-persistent: not saved


def test_causal_mask_is_the_notes_upper_triangle_of_minus_infinity():
    m = causal_mask(4, 4)
    assert torch.equal(torch.isinf(m), torch.triu(torch.ones(4, 4, dtype=torch.bool), diagonal=1))
    assert (m[~torch.isinf(m)] == 0).all()
    # with 3 cached positions, the 2 new queries see keys 0..3 and 0..4
    assert torch.isinf(causal_mask(2, 5)).tolist() == [[False] * 4 + [True], [False] * 5]


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
def test_causality_changing_token_j_leaves_earlier_logits_unchanged(name, attention):
    model = build(name, attention=attention)
    idx = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(1))
    j = 9
    changed = idx.clone()
    changed[:, j] = (idx[:, j] + 1) % 48
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=0)
    assert not torch.allclose(a[:, j], b[:, j])


@pytest.mark.parametrize("shape", [(2, 4, 16, 8), (1, 2, 64, 256)])
def test_bf16_training_on_cpu_attends_in_fp32_only_below_the_threshold(shape):
    """Reference: F.scaled_dot_product_attention itself, on the same bf16 q, k, v upcast to fp32
    (rounded back to bf16) below S·D = FP32_ATTENTION_BELOW, and in bf16 from there on; the
    gradients reach q, k and v in bf16 either way."""
    from llmlab.model import FP32_ATTENTION_BELOW, attends_in_fp32

    attn = build("gpt2", attention="sdpa").train().blocks[0].attn
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(shape, generator=g).bfloat16().requires_grad_() for _ in range(3))
    below = shape[2] * shape[3] < FP32_ATTENTION_BELOW
    assert attends_in_fp32(q) == below
    assert not attends_in_fp32(q.detach()) and not attends_in_fp32(q.detach().float().requires_grad_())
    z = attn.sdpa(q, k, v)
    up = (lambda t: t.float()) if below else (lambda t: t)
    ref = F.scaled_dot_product_attention(up(q), up(k), up(v), is_causal=True).bfloat16()
    assert z.dtype == torch.bfloat16 and torch.equal(z, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # which runs SDPA in bf16 unless told not to
        assert torch.equal(attn.sdpa(q, k, v), ref)
    z.sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 for t in (q, k, v))


@pytest.mark.parametrize("name", VARIANTS)
def test_explicit_attention_equals_sdpa(name):
    """Reference: torch.nn.functional.scaled_dot_product_attention (the "sdpa" path)."""
    idx = torch.randint(0, 48, (3, 16), generator=torch.Generator().manual_seed(2))
    explicit, fused = build(name, attention="explicit"), build(name, attention="sdpa")
    torch.testing.assert_close(explicit(idx), fused(idx), rtol=1e-5, atol=1e-5)


def test_attention_equals_torch_multihead_attention():
    """Reference: torch.nn.MultiheadAttention with a causal mask and the same W^Q, W^K, W^V, W^O."""
    cfg = replace(TINY_VARIANTS["notes"], attention="explicit")
    model = build("notes", attention="explicit")
    attn = model.blocks[0].attn
    mha = torch.nn.MultiheadAttention(cfg.d_model, cfg.n_heads, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias)
        mha.out_proj.weight.copy_(attn.out.weight)
        mha.out_proj.bias.copy_(attn.out.bias)
    x = torch.randn(2, 10, cfg.d_model, generator=torch.Generator().manual_seed(3))
    mask = torch.triu(torch.ones(10, 10, dtype=torch.bool), diagonal=1)
    ref, _ = mha(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


CACHES = [KVCache, StaticKVCache]  # StaticKVCache: every key read, masked, its position on the device


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("attention", ["explicit", "sdpa"])
@pytest.mark.parametrize("kind", CACHES)
def test_kv_cache_decoding_equals_the_full_forward(name, attention, kind):
    model = build(name, attention=attention)
    idx = torch.randint(0, 48, (2, 16), generator=torch.Generator().manual_seed(4))
    full = model(idx)
    cache = kind(model.cfg, batch=2)
    pieces = [model(idx[:, :5], cache=cache)]  # a prompt of 5 tokens ...
    pieces += [model(idx[:, t : t + 1], cache=cache) for t in range(5, 12)]  # ... one at a time ...
    pieces.append(model(idx[:, 12:], cache=cache))  # ... then a chunk of 4 (speculative verification)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.pos == 16


@pytest.mark.parametrize("kind", CACHES)
def test_kv_cache_rolls_back_by_truncation(kind):
    model = build("llama-tiny")
    idx = torch.randint(0, 48, (1, 12), generator=torch.Generator().manual_seed(5))
    cache = kind(model.cfg, batch=1)
    model(idx[:, :8], cache=cache)
    cache.truncate(6)  # drop two positions, as on a rejected draft
    torch.testing.assert_close(model(idx[:, 6:12], cache=cache), model(idx)[:, 6:12], rtol=1e-5, atol=1e-5)


def test_a_static_cache_masks_the_keys_it_has_not_written():
    """The attention pattern a hook sees through a StaticKVCache: the keys of every position,
    with exactly zero weight on those past the query's, and the weights of the plain cache on
    the rest. Its position is kept on the device too, and follows truncation."""
    model = build("gpt2")
    idx = torch.randint(0, 48, (1, 6), generator=torch.Generator().manual_seed(6))
    patterns = {}
    for kind in CACHES:
        cache = kind(model.cfg, batch=1)
        model(idx[:, :5], cache=cache)
        _, saved = model.run_with_cache(idx[:, 5:], cache=cache, names=["blocks.0.attn.hook_pattern"])
        patterns[kind] = saved["blocks.0.attn.hook_pattern"]  # [1, h, 1, T]
    static, plain = patterns[StaticKVCache], patterns[KVCache]
    assert static.shape[-1] == 16 and plain.shape[-1] == 6
    assert torch.equal(static[..., 6:], torch.zeros_like(static[..., 6:]))
    torch.testing.assert_close(static[..., :6], plain, rtol=1e-6, atol=1e-6)
    assert cache.pos == 6 and cache.pos_t.item() == 6
    cache.truncate(2)
    assert cache.pos_t.item() == 2


def test_a_kv_cache_is_checked_against_the_context_and_its_own_contents():
    model = build("notes")  # block_size 16
    for bad in (0, 17):
        with pytest.raises(ValueError, match=f"holds 1 to 16 positions .* not {bad}"):
            KVCache(model.cfg, 1, max_len=bad)
    cache = KVCache(model.cfg, batch=2)
    model(torch.zeros(2, 5, dtype=torch.long), cache=cache)
    for bad in (-1, 6):  # before the start; past what was filled (unwritten memory)
        with pytest.raises(ValueError, match=f"holding 5 positions truncates to 0 … 5, not {bad}"):
            cache.truncate(bad)
    with pytest.raises(ValueError, match="holds a batch of 2 sequences, the input has 1"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    assert cache.pos == 5


def test_forward_past_the_context_is_an_error():
    model = build("notes")
    with pytest.raises(ValueError, match="exceed the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tied_output_layer_is_the_embedding_parameter():
    model = build("notes")
    assert model.unembed.weight is model.embed.weight
    params = list(model.parameters())
    assert sum(p is model.embed.weight for p in params) == 1  # counted once
    untied = build("llama-tiny")
    assert untied.unembed.weight is not untied.embed.weight


@pytest.mark.parametrize("name", ["notes", "nanogpt-shakespeare-char", "gpt2", "llama-tiny"])
def test_num_params_counts_each_parameter_once(name):
    with torch.device("meta"):
        model = GPT(preset(name).model)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(unique.values())


def test_gpt2_preset_has_gpt2s_parameter_count():
    """Reference: GPT-2 small has 124,439,808 parameters (Hugging Face `gpt2`, tied head counted once)."""
    with torch.device("meta"):
        assert GPT(preset("gpt2").model).num_params() == 124_439_808


def test_rope_rotation_keeps_norms_and_depends_only_on_distance():
    D, S = 8, 20
    cos, sin = rope_tables(S, D, 10000.0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)
    qs, ks = q.expand(1, 1, S, D), k.expand(1, 1, S, D)
    rq, rk = apply_rope(qs, cos, sin), apply_rope(ks, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), qs.norm(dim=-1))
    dots = (rq[0, 0, :, None] * rk[0, 0, None, :]).sum(-1)  # [S, S]: <R_m q, R_n k>
    torch.testing.assert_close(dots[5, 2], dots[15, 12], rtol=1e-4, atol=1e-5)  # same distance 3
    torch.testing.assert_close(dots[0, 0], (q * k).sum())


def test_rmsnorm_and_swiglu_follow_their_formulas():
    model = build("llama-tiny")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(6))
    ln = model.blocks[0].ln1
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight
    torch.testing.assert_close(ln(x), ref)
    mlp = model.blocks[0].mlp
    ref = (F.silu(x @ mlp.w1.weight.T) * (x @ mlp.w3.weight.T)) @ mlp.w2.weight.T
    torch.testing.assert_close(mlp(x), ref, rtol=1e-5, atol=1e-6)


def test_notes_ffn_is_relu_of_two_linear_layers():
    model = build("notes")
    mlp = model.blocks[0].mlp
    x = torch.randn(3, 32)
    ref = torch.relu(x @ mlp.w1.weight.T + mlp.w1.bias) @ mlp.w2.weight.T + mlp.w2.bias
    torch.testing.assert_close(mlp(x), ref)


def test_embedding_is_scaled_by_sqrt_h_in_the_notes_preset():
    model = build("notes")
    _, cache = model.run_with_cache(torch.tensor([[3, 4]]), names="hook_embed")
    torch.testing.assert_close(cache["hook_embed"][0], model.embed.weight[[3, 4]] * math.sqrt(32))


def test_dropout_is_active_only_in_training():
    model = build("notes", dropout=0.5)
    idx = torch.randint(0, 48, (1, 8))
    torch.testing.assert_close(model(idx), model(idx))
    model.train()
    assert not torch.allclose(model(idx), model(idx))


def test_config_rejects_impossible_shapes():
    from llmlab.errors import ConfigError

    with pytest.raises(ConfigError, match="not divisible"):
        ModelConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)

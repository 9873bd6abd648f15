"""Fused residual-add + RMSNorm, RoPE and SiLU * up against the transformers modules they replace, in the
interpreter."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, rotate_half

from .interpreter import interpreted

layers = interpreted("layers")
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# bf16: the interpreter truncates float32 -> bf16 instead of rounding (one ulp, 2^-7 relative)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add+norm"])
def test_add_rmsnorm_matches_llama_rmsnorm(dtype, with_residual):
    hidden = 96  # not a power of two: the tail of the block is masked
    norm = LlamaRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(hidden) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(5, hidden).to(dtype)
    residual = torch.randn(5, hidden).to(dtype)
    h = x + residual if with_residual else x
    want = norm(h)
    res = residual.clone() if with_residual else None
    got = layers.add_rmsnorm(x, norm.weight, 1e-5, residual=res)
    torch.testing.assert_close(got, want, **TOL[dtype])
    if with_residual:
        torch.testing.assert_close(res, h, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_fused_qkv_columns_matches_transformers(dtype):
    heads, kv_heads, head_dim = 4, 2, 32
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64)
    rotary = LlamaRotaryEmbedding(cfg)
    cos, sin = rotary(torch.empty(0), torch.arange(64)[None])  # [1, 64, D] each
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    positions = torch.tensor([0, 5, 63, 17, 17])
    qkv = torch.randn(5, (heads + 2 * kv_heads) * head_dim).to(dtype)  # a fused QKV output: q/k are views
    q = qkv[:, :heads * head_dim].view(5, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(5, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim:].clone()
    c, s = cos[positions][:, None], sin[positions][:, None]
    want_q, want_k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
    layers.rope_(q, k, cos, sin, positions)
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k, want_k, **TOL[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_of_fused_gate_up(dtype):
    inter = 80
    gate_up = torch.randn(3, 2 * inter).to(dtype)
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    torch.testing.assert_close(layers.silu_mul(gate_up, block=32), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_and_cache_writes_rotated_k_and_v_into_their_slots(dtype):
    heads, kv_heads, head_dim, slots = 4, 2, 32, 40
    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=64)
    cos, sin = LlamaRotaryEmbedding(cfg)(torch.empty(0), torch.arange(64)[None])
    cos, sin = cos[0].to(dtype), sin[0].to(dtype)
    positions, slot_mapping = torch.tensor([3, 4, 0]), torch.tensor([17, 18, 33])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q = qkv[:, :heads * head_dim].view(3, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(3, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(3, kv_heads, head_dim)
    c, s = cos[positions][:, None], sin[positions][:, None]
    want_q, want_k, k_before = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s, k.clone()
    k_cache = torch.zeros(slots, kv_heads, head_dim, dtype=dtype)
    v_cache = torch.zeros(slots, kv_heads, head_dim, dtype=dtype)
    layers.rope_and_cache_(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)
    torch.testing.assert_close(q, want_q, **TOL[dtype])
    torch.testing.assert_close(k_cache[slot_mapping], want_k, **TOL[dtype])
    assert torch.equal(v_cache[slot_mapping], v) and torch.equal(k, k_before)
    others = torch.ones(slots, dtype=torch.bool).index_fill_(0, slot_mapping, False)
    assert not k_cache[others].any() and not v_cache[others].any()  # no other slot written


def test_rope_and_cache_skips_padding_rows():
    q, k, v = (torch.randn(2, 2, 16) for _ in range(3))
    cos, sin = torch.ones(8, 16), torch.zeros(8, 16)
    k_cache, v_cache = torch.zeros(4, 2, 16), torch.zeros(4, 2, 16)
    layers.rope_and_cache_(q, k, v, cos, sin, torch.tensor([1, 0]), k_cache, v_cache, torch.tensor([2, -1]))
    assert torch.equal(k_cache[2], k[0]) and torch.equal(v_cache[2], v[0])
    assert not k_cache[[0, 1, 3]].any() and not v_cache[[0, 1, 3]].any()

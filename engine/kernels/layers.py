"""Fused elementwise layer ops: residual-add + RMSNorm, RoPE in place on q/k, SiLU(gate) * up.

Each replaces a chain of PyTorch ops of the transformers modules (RMSNorm: to/pow/mean/add/rsqrt/mul/to/mul;
rotate_half: chunk/neg/cat/mul/mul/add per tensor; the MLP's act and mul) with one kernel that reads its
input once and computes in float32. Math follows transformers' Llama modules: RMSNorm (Zhang & Sennrich,
2019) casts the normalised row to the input dtype before the weight; RoPE (Su et al., 2021) in the
rotate-half layout, where the cos/sin tables repeat their first half.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PAD_SLOT_ID = -1  # slot_mapping entry of a padding row (a CUDA graph's bucket): no cache write
PAD_SLOT = tl.constexpr(PAD_SLOT_ID)  # the same, as the kernels read it


@triton.jit
def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, n_cols, eps, stride_x, stride_r, stride_o,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dtype = x.dtype
    xf = x.to(tl.float32)  # all arithmetic in float32 (as the GPU does for bf16 anyway)
    if HAS_RESIDUAL:
        xf += tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        xf = xf.to(dtype)  # rounded to the model dtype, as ``h = h + o`` is before the norm reads it
        tl.store(res_ptr + row * stride_r + cols, xf, mask=mask)
        xf = xf.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd).to(dtype).to(tl.float32) * w
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual += x; return rmsnorm(residual) * weight`` (``rmsnorm(x) * weight`` without a residual).

    Args:
        x: Shape: [num_tokens, hidden].
        weight: Shape: [hidden].
        residual: Shape: [num_tokens, hidden], updated in place.
    Returns:
        Shape: [num_tokens, hidden].
    """
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    res = x if residual is None else residual
    _add_rmsnorm_kernel[(num_tokens,)](
        x, res, weight, out, hidden, eps, x.stride(0), res.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden))
    return out


@triton.jit
def _rotate_heads(src, dst, stride_src, stride_dst, cos, sin, num_heads, i, i_mask, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """One token's heads, [H, D] rows at ``src`` (head stride ``stride_src``), rotated into ``dst``."""
    h = tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & i_mask[None, :]
    first = src + h[:, None] * stride_src + i[None, :]  # [H, half]: the first halves
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out = dst + h[:, None] * stride_dst + i[None, :]
    tl.store(out, (x1f * cos - x2f * sin).to(dst.dtype.element_ty), mask=mask)
    tl.store(out + HALF, (x2f * cos + x1f * sin).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_cs, stride_ch,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr, WRITE_CACHE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]  # [1, half]
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    q_row = q_ptr + t * stride_qt
    _rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, NUM_Q_HEADS, i, i_mask, HALF, BLOCK_H)
    k_row = k_ptr + t * stride_kt
    if WRITE_CACHE:  # rotated k and v straight into the token's cache slot; the QKV buffer's k stays as it was
        slot = tl.load(slots_ptr + t).to(tl.int64)
        if slot != PAD_SLOT:  # a CUDA graph's padding row: nothing to keep
            _rotate_heads(k_row, k_cache_ptr + slot * stride_cs, stride_kh, stride_ch, cos, sin, NUM_K_HEADS, i,
                          i_mask, HALF, BLOCK_H)
            h = tl.arange(0, BLOCK_H)
            d = tl.arange(0, 2 * BLOCK_HALF)
            mask = (h < NUM_K_HEADS)[:, None] & (d < 2 * HALF)[None, :]
            v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
            tl.store(v_cache_ptr + slot * stride_cs + h[:, None] * stride_ch + d[None, :], v, mask=mask)
    else:
        _rotate_heads(k_row, k_row, stride_kh, stride_kh, cos, sin, NUM_K_HEADS, i, i_mask, HALF, BLOCK_H)


def _check_rows(*tensors: torch.Tensor) -> None:
    if any(t.stride(-1) != 1 for t in tensors):
        raise ValueError("the RoPE kernel needs a contiguous last dimension")


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          positions: torch.Tensor) -> None:
    """Rotates q and k in place: ``x * cos[pos] + rotate_half(x) * sin[pos]`` per head.

    Args:
        q: Shape: [num_tokens, H, D] (may be a column view of a fused QKV output: any token/head strides).
        k: Shape: [num_tokens, kv_heads, D].
        cos, sin: Shape: [max_len, D], rotate-half tables (second half = first half), one layout.
        positions: Shape: [num_tokens].
    """
    _rope(q, k, None, cos, sin, positions, None, None, None)


def rope_and_cache_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """``rope_`` on q in place; rotated k and v written to the cache (``k_cache[slot_mapping[t]] = rope(k[t])``,
    ``v_cache[slot_mapping[t]] = v[t]``): one launch for what was RoPE plus two cache writes.

    Args:
        v: Shape: [num_tokens, kv_heads, D].
        k_cache, v_cache: Shape: [slots, kv_heads, D] (this layer), contiguous.
        slot_mapping: Shape: [num_tokens], each token's cache slot; ``PAD_SLOT`` (-1): write nothing.
    """
    _rope(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)


def _rope(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_q, head_dim = q.shape
    write = k_cache is not None
    _check_rows(q, k, cos, *((v, k_cache, v_cache) if write else ()))
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must share one layout")
    half = head_dim // 2
    v, k_cache, v_cache, slot_mapping = (v, k_cache, v_cache, slot_mapping) if write else (k, k, k, positions)
    _rope_kernel[(num_tokens,)](
        q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(0), k_cache.stride(1),
        NUM_Q_HEADS=num_q, NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])), BLOCK_HALF=triton.next_power_of_2(half),
        WRITE_CACHE=write)


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, stride_gu, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(gate_up: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """``silu(gate) * up`` for a fused gate_up output ``[gate | up]``.

    Args:
        gate_up: Shape: [num_tokens, 2 * intermediate].
    Returns:
        Shape: [num_tokens, intermediate].
    """
    num_tokens, width = gate_up.shape
    n = width // 2
    out = gate_up.new_empty(num_tokens, n)
    block = min(block, triton.next_power_of_2(n))
    _silu_mul_kernel[(num_tokens, triton.cdiv(n, block))](gate_up, out, n, gate_up.stride(0), out.stride(0),
                                                         BLOCK=block)
    return out

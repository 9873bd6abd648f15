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
def _rotate_heads(base, t, stride_t, stride_h, cos, sin, num_heads, i, i_mask, HALF: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    h = tl.arange(0, BLOCK_H)
    mask = (h < num_heads)[:, None] & i_mask[None, :]
    first = base + t * stride_t + h[:, None] * stride_h + i[None, :]  # [H, half]: the first halves
    x1 = tl.load(first, mask=mask, other=0.0)
    x2 = tl.load(first + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(first, (x1f * cos - x2f * sin).to(x1.dtype), mask=mask)
    tl.store(first + HALF, (x2f * cos + x1f * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    i_mask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]  # [1, half]
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=i_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, i, i_mask, HALF, BLOCK_H)
    _rotate_heads(k_ptr, t, stride_kt, stride_kh, cos, sin, NUM_K_HEADS, i, i_mask, HALF, BLOCK_H)


def rope_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
          positions: torch.Tensor) -> None:
    """Rotates q and k in place: ``x * cos[pos] + rotate_half(x) * sin[pos]`` per head.

    Args:
        q: Shape: [num_tokens, H, D] (may be a column view of a fused QKV output: any token/head strides).
        k: Shape: [num_tokens, kv_heads, D].
        cos, sin: Shape: [max_len, D], rotate-half tables (second half = first half).
        positions: Shape: [num_tokens].
    """
    num_tokens, num_q, head_dim = q.shape
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        raise ValueError("rope_ needs a contiguous last dimension and cos/sin of one layout")
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q_HEADS=num_q, NUM_K_HEADS=k.shape[1], HALF=half,
        BLOCK_H=triton.next_power_of_2(max(num_q, k.shape[1])), BLOCK_HALF=triton.next_power_of_2(half))


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

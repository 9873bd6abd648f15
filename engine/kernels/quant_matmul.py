"""Weight-only quantized GEMM for the CUDA path: w8a16 (int8 or fp8 e4m3 per output channel) and w4a16 (int4
group-wise).

    y[m, n] = sum_k x[m, k] * W[n, k]      int8, fp8: W = q * s[n]      int4: W = (q - 8) * s[g, n] + z[g, n]

with ``engine/quantization.py``'s formats as they are stored (no repacking at load): int8 ``q`` ``[N, K]``, fp8
codes as their uint8 bits ``[N, K]`` (bitcast to e4m3 in registers, converted to the activations' dtype: exact),
int4 two nibbles per byte along K (``[N, K / 2]`` uint8, column ``2j`` in the low nibble) with scales and
zeros ``[K / g, N, 2]``. Weights are read as codes and never dequantized into memory: each program multiplies
a tile of ``x`` by the tile's codes (exact in bf16 / fp16: |q| <= 127, and e4m3 has fewer bits than either) with
a float32 accumulator, and applies the scale after the dot: per output channel once at the end (int8, fp8), per
group as
``part * s + rowsum(x) * (z - 8 s)`` (int4; a K tile never straddles two groups). A decode step has few rows
and few output tiles, so K is split across programs until the grid covers the GPU's SMs (each split writes
float32 partials; their sum is one more op, deterministic, unlike atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _quant_matmul_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, n_rows, n_out, n_in, k_per_split, stride_xm, stride_os, stride_om,
    GROUP: tl.constexpr, INT4: tl.constexpr, FP8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    m_mask, n_mask = m < n_rows, n < n_out
    rows, cols = m.to(tl.int64), n.to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = split * k_per_split
    for k0 in range(k_start, tl.minimum(k_start + k_per_split, n_in), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < n_in
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)  # [M, K]
        w_mask = n_mask[None, :] & k_mask[:, None]
        if INT4:
            packed = tl.load(w_ptr + cols[None, :] * (n_in // 2) + (k // 2)[:, None], mask=w_mask, other=0)
            q = (packed >> ((k % 2) * 4).to(tl.uint8)[:, None]) & 15  # [K, N] codes in [0, 15]
            part = tl.dot(x, q.to(x.dtype), input_precision="ieee")  # [M, N]
            sz = s_ptr + ((k0 // GROUP) * n_out + cols) * 2  # this tile's group: [K / g, N, 2]
            s = tl.load(sz, mask=n_mask, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=n_mask, other=0.0).to(tl.float32)
            x_sum = tl.sum(x.to(tl.float32), 1)  # [M]
            acc += part * s[None, :] + x_sum[:, None] * (z - 8 * s)[None, :]
        else:
            q = tl.load(w_ptr + cols[None, :] * n_in + k[:, None], mask=w_mask, other=0)  # [K, N] int8 / uint8
            if FP8:
                q = q.to(tl.float8e4nv, bitcast=True)
            acc += tl.dot(x, q.to(x.dtype), input_precision="ieee")
    if not INT4:
        acc *= tl.load(s_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split.to(tl.int64) * stride_os + rows[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def tiles(n_rows: int, group_size: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for ``n_rows`` rows: a decode step's few rows take the smallest tile
    ``tl.dot`` allows; prefill chunks take square tiles. An int4 K tile stays inside one group."""
    block_m = 16 if n_rows <= 16 else 32 if n_rows <= 32 else 64
    block_k = 128 if n_rows <= 16 else 64
    return block_m, 64, min(block_k, group_size) if group_size else block_k


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, fp8: bool = False,
                 num_sms: int = 1) -> torch.Tensor:
    """``x @ W.T`` for a quantized ``W``.

    Args:
        x: Shape: [M, K], bf16 / fp16 / fp32 (the output's dtype too).
        qweight: int8 Shape: [N, K]; fp8: e4m3 bits, uint8 Shape: [N, K]; int4 (``group_size`` > 0): uint8
            nibbles Shape: [N, K / 2].
        scales: int8, fp8: Shape: [N]; int4: scales and zeros Shape: [K / g, N, 2].
        group_size: 0 for int8 / fp8 (per channel), else the int4 group (a power of two, at least 32).
        fp8: ``qweight`` holds float8 e4m3 codes (sm_89+ converts them; calibration drops the kernel elsewhere).
        num_sms: the GPU's multiprocessors: K is split until the grid covers them.
    Returns:
        Shape: [M, N].
    """
    n_rows, n_in = x.shape
    n_out = qweight.shape[0]
    if x.stride(-1) != 1 or not qweight.is_contiguous() or not scales.is_contiguous():
        raise ValueError("quant_matmul needs contiguous weights and a contiguous last dimension of x")
    if group_size and (group_size < 32 or group_size & (group_size - 1) or n_in % group_size
                       or qweight.shape[1] * 2 != n_in):  # a power of two: every K tile stays in one group
        raise ValueError(f"int4 weight {tuple(qweight.shape)} does not fit K={n_in} in groups of {group_size}")
    if n_rows == 0:
        return x.new_empty(0, n_out)
    block_m, block_n, block_k = tiles(n_rows, group_size)
    grid_mn = triton.cdiv(n_rows, block_m) * triton.cdiv(n_out, block_n)
    k_blocks = triton.cdiv(n_in, block_k)
    splits = max(1, min(num_sms // grid_mn, k_blocks))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k
    splits = triton.cdiv(n_in, k_per_split)
    out = x.new_empty(n_rows, n_out) if splits == 1 else x.new_empty(splits, n_rows, n_out, dtype=torch.float32)
    _quant_matmul_kernel[(triton.cdiv(n_rows, block_m), triton.cdiv(n_out, block_n), splits)](
        x, qweight, scales, out, n_rows, n_out, n_in, k_per_split, x.stride(0),
        out.stride(0) if splits > 1 else 0, out.stride(-2),
        GROUP=group_size or 1, INT4=group_size > 0, FP8=fp8 and not group_size, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k)
    return out if splits == 1 else out.sum(0).to(x.dtype)

"""Paged attention kernels: K/V read straight from the block table, no gathered or padded copy.

The cache layout is the engine's (``engine/attention.py``): one flat slot array per layer,
``[slots, kv_heads, D]``, slot = block_id * block_size + offset.

- ``paged_decode_attention``: one query per sequence. A program owns one (sequence, KV head) pair and the
  ``group = H / kv_heads`` query heads that share it (GQA heads grouped: K/V are read once for the group),
  over one split of the sequence's blocks; with more than one split, a second kernel merges the splits'
  partial results by their log-sum-exp (split-K, flash-decoding; Dao et al., 2023), so a long context
  keeps the GPU busy even at batch 1.
- ``paged_prefill_attention``: varlen queries (``cu_seqlens``, no padding of decode rows to the longest
  query) over cached context + themselves, causal; serves prefill chunks and mixed prefill/decode steps.

Both keep the online softmax (Milakov & Gimelshein, 2018) in float32 with exp2 and a pre-scaled query.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _kv_block(k_ptr, v_ptr, table_row, blk, seq_len, kvh, stride_ks, stride_kh, n, d, d_mask,
              BLOCK_SIZE: tl.constexpr):
    """Block ``blk`` of a sequence's K/V, read through its block table row: k, v [N, D], their positions [N] and
    which of those hold a key (< seq_len)."""
    block_id = tl.load(table_row + blk).to(tl.int64)
    pos = blk * BLOCK_SIZE + n
    n_mask = pos < seq_len
    kv_off = (block_id * BLOCK_SIZE + n)[:, None] * stride_ks + kvh * stride_kh + d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    return tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0), tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0), \
        pos, n_mask


@triton.jit
def _softmax_step(q, k, v, visible, m_i, l_i, acc, qk_scale):
    """One KV block into the online softmax: scores q k^T (log2 units, pre-scaled), masked to ``visible``
    [rows, N]; returns the new running max, sum and unnormalised output."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [rows, N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet: keep exp2 finite
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr, lse_ptr, qk_scale,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    first = split * per_split
    last = tl.minimum(first + per_split, num_blocks)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_SIZE)
    heads = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G, D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for blk in range(first, last):
        k, v, pos, n_mask = _kv_block(k_ptr, v_ptr, tables_ptr + b * stride_tb, blk, seq_len, kvh, stride_ks,
                                      stride_kh, n, d, d_mask, BLOCK_SIZE)
        m_i, l_i, acc = _softmax_step(q, k, v, n_mask[None, :], m_i, l_i, acc, qk_scale)

    l_safe = tl.where(l_i > 0, l_i, 1.0)  # an empty split (short sequence) leaves l = 0: its weight is 0 below
    out = acc / l_safe[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _merge_splits_kernel(
    part_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < NUM_SPLITS
    d_mask = d < HEAD_DIM
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s, mask=s_mask, other=float("-inf"))  # [S]
    w = tl.exp2(lse - tl.max(lse, 0))  # [S]; the first split always holds keys, so the max is finite
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [S, D]
    out = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, block_size: int) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"the Triton kernels need a power-of-two block_size >= 16, got {block_size}")
    if k_cache.shape != v_cache.shape or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share a [slots, kv_heads, D] shape with contiguous D")


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, block_size: int,
                           num_splits: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[b] = softmax(q[b] . K_b[:seq_lens[b]]^T * scale) V_b[:seq_lens[b]]`` for one query per sequence,
    K_b/V_b read through ``block_tables[b]``.

    Args:
        q: Shape: [B, H, D].
        k_cache, v_cache: Shape: [slots, kv_heads, D] (this layer), already holding the new tokens.
        block_tables: Shape: [B, max_blocks] int32; entries past a sequence's blocks are never read.
        seq_lens: Shape: [B] int32, tokens cached per sequence (the query's own included), >= 1.
        num_splits: split-K factor over each sequence's blocks (1: no merge kernel).
        out: Shape: [B, H, D]; written in place when given (a CUDA graph's static buffer).
    Returns:
        Shape: [B, H, D].
    """
    _check_cache(k_cache, v_cache, block_size)
    b, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = num_heads // kv_heads
    out = torch.empty_like(q) if out is None else out
    if num_splits > 1:
        part = torch.empty(b, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part, lse = out.unsqueeze(2), out.new_empty(1, 1, dtype=torch.float32)  # lse unused with one split
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(b, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_SIZE=block_size, NUM_SPLITS=num_splits)
    if num_splits > 1:
        _merge_splits_kernel[(b, num_heads)](
            part, lse, out, part.stride(0), part.stride(1), part.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits))
    return out


def choose_num_splits(batch: int, kv_heads: int, max_blocks: int, num_sms: int) -> int:
    """Splits per sequence so that batch x kv_heads x splits programs fill the GPU's SMs about twice, no more
    splits than blocks, and a power of two (a few graph variants, not one per context length)."""
    want = max(1, math.ceil(2 * num_sms / max(1, batch * kv_heads)))
    return min(triton.next_power_of_2(want), triton.next_power_of_2(max(1, max_blocks)), 16)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, cu_q_ptr, seq_lens_ptr, out_ptr, qk_scale,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + b)
    cached = seq_len - q_len  # tokens before this step's queries
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    q_pos = cached + rows  # [M] position of each query
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_SIZE)
    d_mask = d < HEAD_DIM
    kvh = h // GROUP
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # [M, D]

    # Keys up to the tile's last real query; a tile past the sequence's queries runs no block.
    tile_end = tl.minimum(cached + tl.minimum((tile + 1) * BLOCK_M, q_len), seq_len)
    num_blocks = tl.where(tile * BLOCK_M < q_len, tl.cdiv(tile_end, BLOCK_SIZE), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for blk in range(0, num_blocks):
        k, v, pos, n_mask = _kv_block(k_ptr, v_ptr, tables_ptr + b * stride_tb, blk, seq_len, kvh, stride_ks,
                                      stride_kh, n, d, d_mask, BLOCK_SIZE)
        causal = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])  # [M, N]
        m_i, l_i, acc = _softmax_step(q, k, v, causal, m_i, l_i, acc, qk_scale)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                            max_query_len: int, scale: float, block_size: int, block_m: int = 64,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its cache:
    ``out[t] = softmax(q[t] . K_b[:pos(t)+1]^T * scale) V_b[:pos(t)+1]`` with ``pos(t)`` the token's position,
    ``seq_lens[b] - q_len_b + i`` for the i-th of sequence b's ``q_len_b`` new tokens.

    Args:
        q: Shape: [num_tokens, H, D], sequence b's tokens at rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]``.
        k_cache, v_cache: Shape: [slots, kv_heads, D], already holding the new tokens.
        block_tables: Shape: [B, max_blocks] int32.
        cu_seqlens_q: Shape: [B + 1] int32, cumulative new tokens per sequence.
        seq_lens: Shape: [B] int32, tokens cached per sequence after this step.
        max_query_len: the most new tokens of one sequence (sizes the grid).
    Returns:
        Shape: [num_tokens, H, D].
    """
    _check_cache(k_cache, v_cache, block_size)
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // k_cache.shape[1]
    out = torch.empty_like(q) if out is None else out
    b = seq_lens.shape[0]
    block_m = min(block_m, max(16, triton.next_power_of_2(max_query_len)))
    # 8 warps for the big tiles: with 4, Llama-3.1-8B's (64 x 128) hit 255 registers; 176 with 8, no spills
    num_warps = 8 if head_dim * block_m >= 128 * 64 else 4
    _prefill_kernel[(b, num_heads, triton.cdiv(max_query_len, block_m))](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m,
        BLOCK_SIZE=block_size, num_warps=num_warps)
    return out

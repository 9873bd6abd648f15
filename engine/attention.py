"""Paged KV cache and attention over it.

The cache is one flat slot array per layer; slot = block_id * block_size + offset.
Attention gathers each sequence's keys/values through its block table into a padded
[B, K] layout and runs PyTorch SDPA with a boolean mask, which covers prefill,
chunked prefill and decode with one code path (the gather is the price of not having
a paged-attention kernel; see benchmarks/engine_throughput.py for what it costs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step tensors shared by every layer."""

    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V is written to
    query_index: torch.Tensor  # [B, Q] flat token index of each (sequence, query) cell; padding -> 0
    key_slots: torch.Tensor  # [B, K] cache slot of each sequence's key j; padding -> 0
    mask: torch.Tensor  # [B, 1, Q, K] True where query may attend key
    token_cells: torch.Tensor  # [num_tokens] flat index b * Q + q of each new token in the padded layout


class KVCache:
    """Preallocated keys and values for every layer."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, kv_heads, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, slots, kv_heads, D]

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, kv_heads, D] stored at ``slot_mapping``."""
        self.k[layer].index_copy_(0, slot_mapping, k)
        self.v[layer].index_copy_(0, slot_mapping, v)


def build_metadata(starts: list[int], num_new: list[int], block_tables: list[list[int]],
                   block_size: int, device: torch.device | str) -> AttentionMetadata:
    """Builds the step's attention metadata.

    Args:
        starts: position of each sequence's first new token (= tokens already cached).
        num_new: new tokens per sequence this step.
        block_tables: physical block ids per sequence, covering ``starts[i] + num_new[i]`` tokens.
    """
    b = len(starts)
    q_max = max(num_new)
    ctx = [s + n for s, n in zip(starts, num_new)]
    k_max = max(ctx)
    starts_t = torch.tensor(starts, dtype=torch.long)  # [B]
    num_new_t = torch.tensor(num_new, dtype=torch.long)  # [B]
    offsets = torch.cumsum(num_new_t, 0) - num_new_t  # [B] flat index of each sequence's first token
    q_ar = torch.arange(q_max)  # [Q]
    q_valid = q_ar[None, :] < num_new_t[:, None]  # [B, Q]
    query_index = torch.where(q_valid, offsets[:, None] + q_ar[None, :], 0)  # [B, Q]
    q_pos = torch.where(q_valid, starts_t[:, None] + q_ar[None, :], 0)  # [B, Q]; padding sees key 0 only
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)  # [B, blocks]
    k_ar = torch.arange(k_max)  # [K]
    key_slots = tables[:, k_ar // block_size] * block_size + k_ar % block_size  # [B, K]
    mask = k_ar[None, None, :] <= q_pos[:, :, None]  # [B, Q, K]
    token_cells = (torch.arange(b)[:, None] * q_max + q_ar[None, :])[q_valid]  # [num_tokens]
    new_pos = q_pos[q_valid]  # [num_tokens]
    seq_of_token = torch.arange(b)[:, None].expand(b, q_max)[q_valid]  # [num_tokens]
    slot_mapping = tables[seq_of_token, new_pos // block_size] * block_size + new_pos % block_size
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        query_index=query_index.to(device),
        key_slots=torch.where(k_ar[None, :] < torch.tensor(ctx)[:, None], key_slots, 0).to(device),
        mask=mask[:, None].to(device),
        token_cells=token_cells.to(device),
    )


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of new tokens over everything their sequence has cached.

    ``out[t] = softmax(q[t] . K_seq(t)[:pos(t)+1]^T * scale) V_seq(t)[:pos(t)+1]``

    Args:
        q: Shape: [num_tokens, H, D].
        k_cache, v_cache: Shape: [slots, kv_heads, D] (this layer), already holding the new tokens.
    Returns:
        Shape: [num_tokens, H * D].
    """
    num_tokens, num_heads, head_dim = q.shape
    b, q_max = meta.query_index.shape
    kp = _gather(k_cache, meta.key_slots)  # [B, kv_heads, K, D]
    vp = _gather(v_cache, meta.key_slots)  # [B, kv_heads, K, D]
    if q_max == 1:  # a decode-only step: every sequence has one query, in flat order
        return _decode_attention(q, kp, vp, meta.mask, scale)
    qp = q.index_select(0, meta.query_index.view(-1)).view(b, q_max, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=meta.mask, scale=scale,
                                         enable_gqa=num_heads != kp.shape[1])  # [B, H, Q, D]
    out = out.transpose(1, 2).reshape(b * q_max, num_heads * head_dim)  # [B * Q, H * D]
    return out[meta.token_cells]  # [num_tokens, H * D]


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """cache: [slots, kv_heads, D], slots: [B, K] -> [B, kv_heads, K, D], contiguous.

    ``index_select`` on the flat slot list is ~8x faster on CPU than advanced indexing with a 2-D
    index, and batched matmuls over a contiguous copy ~4x faster than over the strided transpose.
    """
    b, k_len = slots.shape
    rows = cache.index_select(0, slots.view(-1))  # [B * K, kv_heads, D]
    return rows.view(b, k_len, cache.shape[1], cache.shape[2]).transpose(1, 2).contiguous()


def _decode_attention(q: torch.Tensor, kp: torch.Tensor, vp: torch.Tensor, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per sequence, as two batched matmuls with the query heads of a KV head stacked.

    PyTorch's CPU SDPA kernel is tiled for long queries: for Q = 1 in bfloat16 it took 2.3 ms where
    these matmuls take 0.2 ms (B=32, K=192, 9 heads; AMD EPYC, 2 threads), i.e. 45% of decode time.
    Softmax runs in float32, as in transformers' eager attention.

    Args:
        q: Shape: [B, H, D] (token b is sequence b). kp, vp: Shape: [B, kv_heads, K, D].
        mask: Shape: [B, 1, 1, K], True for keys the query may see.
    Returns:
        Shape: [B, H * D].
    """
    b, num_heads, head_dim = q.shape
    kv_heads, k_len = kp.shape[1], kp.shape[2]
    group = num_heads // kv_heads  # query heads sharing a KV head are consecutive (repeat_interleave)
    scores = torch.matmul(q.view(b, kv_heads, group, head_dim), kp.transpose(-1, -2)).float() * scale  # [B, kv, G, K]
    scores.masked_fill_(~mask.view(b, 1, 1, k_len), float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)  # [B, kv, G, K]
    return torch.matmul(probs, vp).reshape(b, num_heads * head_dim)  # [B, H * D]

"""Paged KV cache and attention over it.

The cache is one slot array per layer; slot = block_id * block_size + offset. Two layouts:

- head-major (the CPU path): ``[L, kv_heads, slots, D]``. A sequence's keys are gathered a whole block at a
  time (``block_size * D`` contiguous values per KV head and block) straight into the ``[kv_heads, B, K, D]``
  layout the attention matmuls read, with no transpose copy: on a 2-core Xeon that made decode attention
  1.2-1.8x faster than gathering single slots of a slot-major cache and transposing them (``B`` 1-32, fp32
  and bf16; ``benchmarks/single_stream`` measures the whole engine).
- slot-major (the Triton kernels'): ``[L, slots, kv_heads, D]``.

Attention pads every sequence to the step's widest block table (``K`` = blocks x block size) and masks keys
past each query's position, which covers prefill, chunked prefill and decode with one gather (the gather is
the price of not having a paged-attention kernel on CPU). Masked keys are read too (the tail of a sequence's
last block, padding blocks): what a block's previous owner left there must not reach another request, so
non-finite keys and values are stored as 0 (a NaN times a zero probability is still NaN), and decode scores
are masked by replacement, not by adding -inf. (The Triton path's kernels write the cache themselves, unsanitized:
they load only positions below each sequence's length, so no stale slot is ever read there.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step tensors shared by every layer."""

    block_size: int  # slots per cache block
    slot_mapping: torch.Tensor  # [num_tokens] cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, blocks] each sequence's blocks, padded with block 0 (masked)
    query_index: torch.Tensor | None  # [B, Q] flat token index of each (sequence, query) cell; padding -> 0
    token_cells: torch.Tensor | None  # [num_tokens] flat index b * Q + q of each new token in the padded layout
    mask: torch.Tensor | None  # [B, 1, Q, K] True where query may attend key (steps with Q > 1)
    decode_hidden: torch.Tensor | None  # [1, B, 1, K] True where the query may not attend key (steps with Q = 1)


class KVCache:
    """Preallocated keys and values for every layer (layouts: the module docstring)."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, head_major: bool = False) -> None:
        self.head_major = head_major
        shape = (num_layers, num_kv_heads, num_slots, head_dim) if head_major else (
            num_layers, num_slots, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, kv_heads, slots, D] or [L, slots, kv_heads, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views, made once: ops per step

    @staticmethod
    def bytes_per_slot(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def write(self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: [num_tokens, kv_heads, D] stored at ``slot_mapping``, non-finite values as 0 (module docstring)."""
        k, v = torch.nan_to_num(k, 0.0, 0.0, 0.0), torch.nan_to_num(v, 0.0, 0.0, 0.0)
        k_cache, v_cache = self._layers[layer]
        if self.head_major:
            k_cache.index_copy_(1, slot_mapping, k.transpose(0, 1))
            v_cache.index_copy_(1, slot_mapping, v.transpose(0, 1))
        else:
            k_cache.index_copy_(0, slot_mapping, k)
            v_cache.index_copy_(0, slot_mapping, v)

    def block_rows(self, block_tables: torch.Tensor, block_size: int) -> torch.Tensor:
        """Head-major only: the rows ``gather`` reads, for every (KV head, sequence, block) in that order.

        Args:
            block_tables: Shape: [B, blocks].
        Returns:
            Shape: [kv_heads * B * blocks].
        """
        kv_heads, num_slots = self.k.shape[1], self.k.shape[2]
        heads = torch.arange(kv_heads, device=block_tables.device)[:, None] * (num_slots // block_size)
        return (heads + block_tables.reshape(1, -1)).view(-1)

    def gather(self, layer: int, rows: torch.Tensor, num_seqs: int, block_size: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head-major only: each sequence's keys and values, whole blocks at a time (``rows``: ``block_rows``).

        Returns:
            k, v. Shape: [kv_heads, B, K, D] each, contiguous (K = blocks x block size).
        """
        kv_heads, num_slots, head_dim = self.k.shape[1:]
        out = []
        for cache in self._layers[layer]:
            blocks = cache.view(kv_heads * (num_slots // block_size), block_size * head_dim)
            out.append(blocks.index_select(0, rows).view(kv_heads, num_seqs, -1, head_dim))
        return out[0], out[1]


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
    starts_t = torch.tensor(starts, dtype=torch.long)  # [B]
    num_new_t = torch.tensor(num_new, dtype=torch.long)  # [B]
    width = max(len(t) for t in block_tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)  # [B, blocks]
    k_ar = torch.arange(width * block_size)  # [K]
    q_ar = torch.arange(q_max)  # [Q]
    q_valid = q_ar[None, :] < num_new_t[:, None]  # [B, Q]
    q_pos = torch.where(q_valid, starts_t[:, None] + q_ar[None, :], 0)  # [B, Q]; padding sees key 0 only
    new_pos = q_pos[q_valid]  # [num_tokens]
    seq_of_token = torch.arange(b)[:, None].expand(b, q_max)[q_valid]  # [num_tokens]
    slot_mapping = tables[seq_of_token, new_pos // block_size] * block_size + new_pos % block_size
    allowed = k_ar[None, None, :] <= q_pos[:, :, None]  # [B, Q, K]
    if q_max == 1:  # a decode-only step: every sequence has one query, in flat order
        return AttentionMetadata(block_size=block_size, slot_mapping=slot_mapping.to(device),
                                 block_tables=tables.to(device), query_index=None, token_cells=None, mask=None,
                                 decode_hidden=(~allowed).view(1, b, 1, -1).to(device))
    offsets = torch.cumsum(num_new_t, 0) - num_new_t  # [B] flat index of each sequence's first token
    query_index = torch.where(q_valid, offsets[:, None] + q_ar[None, :], 0)  # [B, Q]
    token_cells = (torch.arange(b)[:, None] * q_max + q_ar[None, :])[q_valid]  # [num_tokens]
    return AttentionMetadata(block_size=block_size, slot_mapping=slot_mapping.to(device),
                             block_tables=tables.to(device), query_index=query_index.to(device),
                             token_cells=token_cells.to(device), mask=allowed[:, None].to(device), decode_hidden=None)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Causal attention of new tokens over everything their sequence has cached.

    ``out[t] = softmax(q[t] . K_seq(t)[:pos(t)+1]^T * scale) V_seq(t)[:pos(t)+1]``

    Args:
        q: Shape: [num_tokens, H, D].
        k, v: Shape: [kv_heads, B, K, D]: each sequence's keys / values (``KVCache.gather``), already holding
            the new tokens.
    Returns:
        Shape: [num_tokens, H * D].
    """
    num_tokens, num_heads, head_dim = q.shape
    if meta.decode_hidden is not None:
        return _decode_attention(q, k, v, meta.decode_hidden, scale)
    b, q_max = meta.query_index.shape
    qp = q.index_select(0, meta.query_index.view(-1)).view(b, q_max, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(qp, k.transpose(0, 1), v.transpose(0, 1), attn_mask=meta.mask, scale=scale,
                                         enable_gqa=num_heads != k.shape[0])  # [B, H, Q, D]
    out = out.transpose(1, 2).reshape(b * q_max, num_heads * head_dim)  # [B * Q, H * D]
    return out[meta.token_cells]  # [num_tokens, H * D]


def _decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor,
                      scale: float) -> torch.Tensor:
    """One query per sequence, as two batched matmuls with the query heads of a KV head stacked.

    PyTorch's CPU SDPA kernel is tiled for long queries: for Q = 1 in bfloat16 it took 2.3 ms where
    these matmuls take 0.2 ms (B=32, K=192, 9 heads; AMD EPYC, 2 threads), i.e. 45% of decode time.
    Softmax runs in float32, as in transformers' eager attention.

    Args:
        q: Shape: [B, H, D] (token b is sequence b). k, v: Shape: [kv_heads, B, K, D].
        hidden: Shape: [1, B, 1, K], True for keys the query may not see.
    Returns:
        Shape: [B, H * D].
    """
    b, num_heads, head_dim = q.shape
    kv_heads = k.shape[0]
    group = num_heads // kv_heads  # query heads sharing a KV head are consecutive (repeat_interleave)
    qg = q.view(b, kv_heads, group, head_dim).transpose(0, 1)  # [kv, B, G, D]
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [kv, B, G, K]
    scores = (scores if scores.dtype == torch.float32 else scores.float()).mul_(scale)
    scores.masked_fill_(hidden, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)  # [kv, B, G, K]
    return torch.matmul(probs, v).transpose(0, 1).reshape(b, num_heads * head_dim)  # [B, H * D]

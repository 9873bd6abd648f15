"""Paged decode and varlen prefill attention kernels against a naive per-sequence reference, in the
interpreter: ragged lengths across block boundaries, shuffled block tables, GQA ratios 1/4/8, split-K on
and off, mixed prefill + decode rows, fp32 and bf16."""
from __future__ import annotations

import pytest
import torch

from .interpreter import interpreted

attn = interpreted("paged_attention")
BLOCK = 16
KV_HEADS = 2
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def make_cache(seq_lens: list[int], head_dim: int, dtype: torch.dtype, seed: int = 0):
    """A KV cache whose sequences own shuffled, non-contiguous blocks; slots outside them hold garbage."""
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in blocks_needed:
        tables.append(perm[at:at + n])
        at += n
    width = max(blocks_needed)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    k = torch.randn(num_blocks * BLOCK, KV_HEADS, head_dim, generator=g).to(dtype)
    v = torch.randn(num_blocks * BLOCK, KV_HEADS, head_dim, generator=g).to(dtype)
    return k, v, block_tables


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, positions: list[int],
              scale: float) -> torch.Tensor:
    """q: [n, H, D] queries at ``positions`` of one sequence -> [n, H, D], in float64."""
    num_heads = q.shape[1]
    ctx = positions[-1] + 1
    slots = torch.tensor([int(table[j // BLOCK]) * BLOCK + j % BLOCK for j in range(ctx)])
    keys = k[slots].double().repeat_interleave(num_heads // KV_HEADS, dim=1)  # [ctx, H, D]
    values = v[slots].double().repeat_interleave(num_heads // KV_HEADS, dim=1)
    scores = torch.einsum("nhd,khd->hnk", q.double(), keys) * scale  # [H, n, ctx]
    visible = torch.arange(ctx)[None, :] <= torch.tensor(positions)[:, None]  # [n, ctx]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hnk,khd->nhd", probs, values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_attention_matches_reference(dtype, group, num_splits):
    seq_lens = [1, 16, 17, 70]  # one token, a full block, one past it, several blocks with a ragged tail
    head_dim = 32
    k, v, tables = make_cache(seq_lens, head_dim, dtype)
    q = torch.randn(len(seq_lens), KV_HEADS * group, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = head_dim ** -0.5
    out = attn.paged_decode_attention(q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32), scale, BLOCK,
                                      num_splits=num_splits)
    want = torch.cat([reference(q[b:b + 1], k, v, tables[b], [n - 1], scale) for b, n in enumerate(seq_lens)])
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


def test_decode_attention_writes_into_the_given_buffer_and_skips_empty_splits():
    seq_lens = [5, 40]  # with 8 splits, most of the short sequence's splits hold no block
    k, v, tables = make_cache(seq_lens, 16, torch.float32, seed=3)
    q = torch.randn(2, 4, 16)
    out = torch.full_like(q, float("nan"))
    got = attn.paged_decode_attention(q, k, v, tables, torch.tensor(seq_lens, dtype=torch.int32), 0.25, BLOCK,
                                      num_splits=8, out=out)
    assert got is out and not out.isnan().any()
    want = torch.cat([reference(q[b:b + 1], k, v, tables[b], [n - 1], 0.25) for b, n in enumerate(seq_lens)])
    torch.testing.assert_close(out.double(), want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_attention_mixed_chunks_and_decode_rows(dtype, group):
    cached = [0, 20, 33, 7]  # a fresh prompt, a chunk after a cached prefix, a decode row, another decode row
    num_new = [5, 19, 1, 1]
    seq_lens = [c + n for c, n in zip(cached, num_new)]
    head_dim = 32
    k, v, tables = make_cache(seq_lens, head_dim, dtype, seed=2)
    q = torch.randn(sum(num_new), KV_HEADS * group, head_dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    cu = torch.tensor([0] + torch.tensor(num_new).cumsum(0).tolist(), dtype=torch.int32)
    scale = head_dim ** -0.5
    out = attn.paged_prefill_attention(q, k, v, tables, cu, torch.tensor(seq_lens, dtype=torch.int32),
                                       max(num_new), scale, BLOCK, block_m=16)
    want = torch.cat([reference(q[cu[b]:cu[b + 1]], k, v, tables[b], list(range(c, c + n)), scale)
                      for b, (c, n) in enumerate(zip(cached, num_new))])
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


@pytest.mark.parametrize(("batch", "kv_heads", "max_blocks", "want"), [
    (1, 8, 256, 16),  # one long sequence: split to fill the SMs, capped at 16
    (256, 8, 8, 1),  # a full batch already fills them
    (4, 8, 2, 2),  # no more splits than blocks
])
def test_num_splits_fill_the_gpu_without_exceeding_blocks(batch, kv_heads, max_blocks, want):
    assert attn.choose_num_splits(batch, kv_heads, max_blocks, num_sms=132) == want

"""The CPU path's paged attention over the head-major KV cache against a naive reference: ragged and shuffled
block tables, a step mixing prefill chunks and decode rows, GQA; and what a block's previous owner left in it
(NaN, inf) never reaches the next request."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llmaas.engine.attention import KVCache, build_metadata, paged_attention
from llmaas.engine.model import CausalLM, _rope
from tests.models import tiny_llama

BLOCK = 4
KV_HEADS, HEAD_DIM = 2, 8
NUM_BLOCKS = 16


def reference(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], starts: list[int],
              num_new: list[int], scale: float) -> torch.Tensor:
    """Row by row: token j of sequence s (position starts[s] + j) attends that sequence's keys 0..its position."""
    out, row = [], 0
    group = q.shape[1] // KV_HEADS
    for s, (start, n) in enumerate(zip(starts, num_new)):
        for j in range(n):
            pos = start + j
            k = keys[s][:pos + 1].repeat_interleave(group, dim=1)  # [pos + 1, H, D]
            v = values[s][:pos + 1].repeat_interleave(group, dim=1)
            scores = torch.einsum("hd,khd->hk", q[row], k) * scale
            out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v).reshape(-1))
            row += 1
    return torch.stack(out)


def fill(cache: KVCache, tables: list[list[int]], lengths: list[int], gen: torch.Generator
         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Writes random keys/values for every sequence's first ``lengths[s]`` positions; returns them."""
    keys, values = [], []
    for table, n in zip(tables, lengths):
        k = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
        v = torch.randn(n, KV_HEADS, HEAD_DIM, generator=gen)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        cache.write(0, slots, k, v)
        keys.append(k)
        values.append(v)
    return keys, values


@pytest.mark.parametrize("starts, num_new", [
    ([5, 0, 13], [1, 1, 1]),  # decode rows of ragged lengths
    ([0, 7, 3], [6, 1, 4]),  # prefill chunks of different sizes beside a decode row
    ([0], [9]),  # one prompt over three blocks, one slot of the last in use
])
@pytest.mark.parametrize("heads", [2, 4])  # GQA group 1 and 2
def test_paged_attention_equals_the_reference(starts, num_new, heads):
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(NUM_BLOCKS, generator=gen).tolist()  # shuffled physical blocks
    lengths = [s + n for s, n in zip(starts, num_new)]
    tables, used = [], 0
    for n in lengths:
        count = -(-n // BLOCK)
        tables.append(order[used:used + count])
        used += count
    cache = KVCache(1, NUM_BLOCKS * BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu", head_major=True)
    cache.k.normal_(generator=gen)  # stale data everywhere no sequence wrote
    cache.v.normal_(generator=gen)
    keys, values = fill(cache, tables, lengths, gen)
    meta = build_metadata(starts, num_new, tables, BLOCK, "cpu")
    q = torch.randn(sum(num_new), heads, HEAD_DIM, generator=gen)
    k_seq, v_seq = cache.gather(0, cache.block_rows(meta.block_tables, BLOCK), len(starts), BLOCK)
    got = paged_attention(q, k_seq, v_seq, meta, 0.3)
    torch.testing.assert_close(got, reference(q, keys, values, starts, num_new, 0.3))


@pytest.mark.parametrize("starts, num_new", [([5, 2], [1, 1]), ([0, 2], [3, 1])])  # decode; prefill beside decode
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_what_a_previous_owner_left_never_reaches_the_next_request(starts, num_new, poison):
    """A request whose values went non-finite freed its blocks; sequences now own them, and read their tails
    (and block 0, the padding block of the shorter table) as masked keys: outputs stay finite and equal the
    reference."""
    gen = torch.Generator().manual_seed(1)
    tables = [[1, 3], [5]]
    cache = KVCache(1, NUM_BLOCKS * BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu", head_major=True)
    every_slot = torch.arange(NUM_BLOCKS * BLOCK)
    bad = torch.full((NUM_BLOCKS * BLOCK, KV_HEADS, HEAD_DIM), poison)
    cache.write(0, every_slot, bad, bad)  # the previous owner's values
    assert_attention_equals_reference(cache, tables, starts, num_new, gen)


def test_decode_masks_huge_stale_keys_by_replacement():
    """Finite stale keys large enough that their scores overflow to inf: adding -inf would make NaN."""
    gen = torch.Generator().manual_seed(3)
    cache = KVCache(1, NUM_BLOCKS * BLOCK, KV_HEADS, HEAD_DIM, torch.float32, "cpu", head_major=True)
    cache.k.fill_(3e38)
    assert_attention_equals_reference(cache, [[1, 3], [5]], [5, 2], [1, 1], gen)


def assert_attention_equals_reference(cache: KVCache, tables: list[list[int]], starts: list[int],
                                      num_new: list[int], gen: torch.Generator) -> None:
    keys, values = fill(cache, tables, [s + n for s, n in zip(starts, num_new)], gen)
    meta = build_metadata(starts, num_new, tables, BLOCK, "cpu")
    q = torch.randn(sum(num_new), 4, HEAD_DIM, generator=gen)
    k_seq, v_seq = cache.gather(0, cache.block_rows(meta.block_tables, BLOCK), len(starts), BLOCK)
    got = paged_attention(q, k_seq, v_seq, meta, 0.3)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference(q, keys, values, starts, num_new, 0.3))


def test_rope_on_q_and_k_together_equals_transformers_rotate_half():
    """The model's own tables (its sign-folded sin) against transformers' apply_rotary_pos_emb with the model's
    rotary module."""
    hf = tiny_llama(seed=0)
    model = CausalLM(hf, 64)
    gen = torch.Generator().manual_seed(2)
    positions = torch.tensor([0, 5, 63])
    heads, kv_heads, d = model.num_heads, model.num_kv_heads, model.head_dim
    q = torch.randn(3, heads, d, generator=gen)
    k = torch.randn(3, kv_heads, d, generator=gen)
    got = _rope(torch.cat([q, k], 1), model.cos[positions][:, None], model.sin_signed[positions][:, None])
    cos, sin = hf.model.rotary_emb(q, positions[None])  # [1, T, D] each
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)  # [1, h, T, D]
    torch.testing.assert_close(got, torch.cat([want_q[0].transpose(0, 1), want_k[0].transpose(0, 1)], 1))

"""KV block book-keeping: which physical blocks each sequence owns, and prefix caching. No torch here.

Prefix caching (vLLM's automatic prefix caching, nano-vllm's block hashing): every block
that fills up with computed tokens gets a hash chained over its predecessors (seeded with
the adapter name, since an adapter changes the K/V). A new sequence whose leading full
blocks hash the same reuses them (reference counted) instead of recomputing them, e.g.
a shared system prompt. Freed blocks keep their contents and hash until they are handed
out again, least recently freed first.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass(slots=True)
class Block:
    ref_count: int = 0
    hash: int | None = None  # set once the block is full of computed tokens
    token_ids: tuple[int, ...] = ()  # the tokens it holds when hashed (guards against hash collisions)


class BlockManager:
    """Fixed-size KV blocks; a sequence's block table grows as it computes tokens."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest freed first
        self._by_hash: dict[int, int] = {}
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (a counter for metrics/tests)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Share of blocks in use, in [0, 1]."""
        return 1.0 - len(self._free) / self.num_blocks

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold its computed tokens plus ``num_new_tokens``."""
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"allocate: {needed} blocks needed, {len(self._free)} free (call can_allocate first)")
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None and self._by_hash.get(block.hash) == block_id:
                del self._by_hash[block.hash]  # its cached contents are about to be overwritten
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(block_id)

    def deallocate(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):  # tail blocks are the least likely to be shared again
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0

    # ----- prefix caching -----
    def _reuses(self, seq: Sequence) -> bool:
        """Whether ``seq`` may take cached blocks: not when it wants every prompt position's logprobs."""
        return self.enable_prefix_caching and seq.params.prompt_logprobs is None

    @staticmethod
    def _seed(seq: Sequence) -> int:
        """Where a sequence's hash chain starts: the adapter's K/V differ, so its blocks never match the base's;
        the salt keeps partitions apart (one tenant cannot time another's prompts through cache hits)."""
        return hash(("llmaas-prefix", seq.lora, seq.cache_salt))

    def _chain(self, seq: Sequence, index: int, tokens: tuple[int, ...]) -> int:
        prev = seq.block_hashes[index - 1] if index else self._seed(seq)
        return hash((prev, tokens))  # pending_hashes() chains the same way

    def match_prefix(self, seq: Sequence) -> int:
        """For a sequence with no blocks: takes cached blocks for its leading full blocks; returns tokens reused.

        At least one token is always left to compute, so the step still produces logits to sample from.
        """
        if not self._reuses(seq) or seq.block_table:
            return 0
        ids = seq.token_ids()
        usable = (len(ids) - 1) // self.block_size
        for i in range(usable):
            tokens = tuple(ids[i * self.block_size:(i + 1) * self.block_size])
            h = self._chain(seq, i, tokens)
            block_id = self._by_hash.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            seq.num_computed_tokens += self.block_size
        return len(seq.block_table) * self.block_size

    def next_block_hash(self, seq: Sequence) -> int | None:
        """Hash of the first full block ``match_prefix`` could not reuse, or None if there is no such block."""
        index = len(seq.block_hashes)
        ids = seq.token_ids()
        if not self._reuses(seq) or (index + 1) * self.block_size > len(ids) - 1:
            return None
        return self._chain(seq, index, tuple(ids[index * self.block_size:(index + 1) * self.block_size]))

    def pending_hashes(self, seq: Sequence, num_new_tokens: int) -> list[int]:
        """Hashes of the blocks ``seq`` completes by computing ``num_new_tokens`` more (committed after the step)."""
        full = (seq.num_computed_tokens + num_new_tokens) // self.block_size
        if not self.enable_prefix_caching or full <= len(seq.block_hashes):
            return []
        ids = seq.token_ids()
        prev = seq.block_hashes[-1] if seq.block_hashes else self._seed(seq)
        out = []
        for i in range(len(seq.block_hashes), full):
            prev = hash((prev, tuple(ids[i * self.block_size:(i + 1) * self.block_size])))
            out.append(prev)
        return out

    def commit(self, seq: Sequence) -> None:
        """Hashes the blocks that ``seq`` has completely computed, so later sequences can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= len(seq.block_hashes):
            return
        ids = seq.token_ids()
        for i in range(len(seq.block_hashes), full):
            tokens = tuple(ids[i * self.block_size:(i + 1) * self.block_size])
            h = self._chain(seq, i, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if block.hash is None and h not in self._by_hash:
                block.hash, block.token_ids = h, tokens
                self._by_hash[h] = seq.block_table[i]

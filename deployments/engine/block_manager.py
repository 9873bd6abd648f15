"""KV block book-keeping: which physical blocks each sequence owns. No torch here."""
from __future__ import annotations

from collections import deque

from .sequence import Sequence


class BlockManager:
    """A free list of fixed-size KV blocks; a sequence's block table grows as it computes tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

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
        seq.block_table.extend(self._free.popleft() for _ in range(needed))

    def deallocate(self, seq: Sequence) -> None:
        self._free.extend(seq.block_table)
        seq.block_table.clear()
        seq.num_computed_tokens = 0

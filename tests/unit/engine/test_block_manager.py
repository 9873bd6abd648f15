from __future__ import annotations

import pytest

from llmaas.engine.block_manager import BlockManager
from llmaas.engine.sampling_params import SamplingParams
from llmaas.engine.sequence import Sequence


def seq(n_prompt: int) -> Sequence:
    return Sequence("r", list(range(n_prompt)), SamplingParams(), arrival=0)


@pytest.mark.parametrize("computed, new, have, needed", [
    (0, 1, 0, 1),
    (0, 4, 0, 1),
    (0, 5, 0, 2),
    (4, 1, 1, 1),
    (3, 1, 1, 0),
    (7, 9, 2, 2),
])
def test_blocks_needed(computed, new, have, needed):
    bm = BlockManager(num_blocks=10, block_size=4)
    s = seq(20)
    s.num_computed_tokens = computed
    s.block_table = list(range(have))
    assert bm.num_blocks_needed(s, new) == needed


def test_allocate_and_deallocate_round_trip():
    bm = BlockManager(num_blocks=3, block_size=4)
    s = seq(10)
    assert bm.can_allocate(s, 10)
    bm.allocate(s, 10)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 0 and bm.usage == 1.0
    assert not bm.can_allocate(seq(1), 1)
    bm.deallocate(s)
    assert bm.num_free_blocks == 3 and s.block_table == [] and s.num_computed_tokens == 0


def test_allocate_beyond_free_raises():
    bm = BlockManager(num_blocks=1, block_size=4)
    with pytest.raises(RuntimeError, match="can_allocate"):
        bm.allocate(seq(9), 9)

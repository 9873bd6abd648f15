from __future__ import annotations

import pytest

from llmaas.engine.block_manager import BlockManager
from llmaas.engine.config import EngineConfig
from llmaas.engine.sampling_params import SamplingParams
from llmaas.engine.scheduler import Scheduler
from llmaas.engine.sequence import Sequence, SequenceStatus


def make(num_blocks=16, block_size=4, budget=32, max_seqs=4) -> Scheduler:
    cfg = EngineConfig(max_model_len=64, num_kv_blocks=num_blocks, block_size=block_size,
                       max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def add(s: Scheduler, n_prompt: int, arrival: int, tokens: list[int] | None = None) -> Sequence:
    """A sequence with its own prompt (distinct per arrival, so no prefix sharing) unless ``tokens`` is given."""
    prompt = tokens if tokens is not None else list(range(1000 * arrival, 1000 * arrival + n_prompt))
    seq = Sequence(str(arrival), prompt, SamplingParams(), arrival=arrival)
    s.add(seq)
    return seq


def run(s: Scheduler, batch) -> None:
    """Pretends the model ran: marks tokens computed and appends one sampled token when a prefill completes."""
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += n
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(0)


@pytest.mark.parametrize("prompts, budget, expected", [
    ([10, 10], 32, [10, 10]),  # both prompts fit the budget
    ([30, 10], 32, [30, 2]),  # second prompt chunked
    ([40], 32, [32]),  # a long prompt is chunked
    ([5, 5, 5, 5, 5], 32, [5, 5, 5, 5]),  # max_num_seqs caps admissions
])
def test_first_step_budget(prompts, budget, expected):
    s = make(budget=budget)
    for i, n in enumerate(prompts):
        add(s, n, i)
    assert s.schedule().num_new_tokens == expected


def test_running_decodes_go_before_new_prefills():
    s = make(budget=8)
    a = add(s, 4, 0)
    run(s, s.schedule())
    add(s, 20, 1)
    batch = s.schedule()
    assert batch.seqs[0] is a and batch.num_new_tokens == [1, 7]


def test_waiting_head_blocks_fcfs_when_cache_is_short():
    s = make(num_blocks=4, block_size=4, budget=64)
    add(s, 12, 0)
    add(s, 8, 1)
    add(s, 2, 2)
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["0"]  # "1" needs 2 blocks, 1 is free; "2" waits behind it


def test_youngest_is_preempted_and_requeued_first():
    s = make(num_blocks=4, block_size=4, budget=64)
    old = add(s, 8, 0)
    young = add(s, 8, 1)
    run(s, s.schedule())  # both prefilled: 8 tokens each => 2 blocks each, cache full
    batch = s.schedule()  # old needs a third block for its 9th token
    assert batch.seqs == [old]
    assert young.status is SequenceStatus.WAITING and young.num_preemptions == 1
    assert young.block_table == [] and young.num_computed_tokens == 0
    assert s.waiting[0] is young


def test_abort_removes_from_either_queue():
    s = make()
    a = add(s, 4, 0)
    s.schedule()
    b = add(s, 4, 1)
    assert s.abort("1") is b and s.abort("0") is a
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 16
    assert s.abort("0") is None


@pytest.mark.parametrize("prompts, expected_first, expected_second", [
    # identical 9-token prompts (two full 4-token blocks + 1): the twin waits a step, then computes 1 token
    ([list(range(9)), list(range(9))], [9], [1, 1]),
    # only the first block is shared: still worth a one-step wait, then the twin computes 5 of its 9
    ([list(range(9)), list(range(4)) + [50, 51, 52, 53, 54]], [9], [1, 5]),
    # nothing shared: both run at once
    ([list(range(9)), list(range(100, 109))], [9, 9], [1, 1]),
    # a prompt shorter than a block has nothing to share
    ([[1, 2, 3], [1, 2, 3]], [3, 3], [1, 1]),
])
def test_twin_waits_a_step_for_blocks_a_batch_mate_computes(prompts, expected_first, expected_second):
    s = make()
    for i, p in enumerate(prompts):
        add(s, len(p), i, tokens=p)
    first = s.schedule()
    assert first.num_new_tokens == expected_first
    run(s, first)
    for seq in first.seqs:
        s.block_manager.commit(seq)
    assert s.schedule().num_new_tokens == expected_second


def test_a_request_waiting_for_a_lora_slot_does_not_hold_up_others():
    cfg = EngineConfig(max_model_len=64, num_kv_blocks=16, block_size=4, max_num_batched_tokens=32, max_num_seqs=8,
                       max_loras=1)
    s = Scheduler(cfg, BlockManager(16, 4))

    def add_lora(arrival: int, lora: str | None) -> Sequence:
        seq = Sequence(str(arrival), list(range(100 * arrival, 100 * arrival + 4)), SamplingParams(), arrival=arrival,
                       lora=lora)
        s.add(seq)
        return seq

    a = add_lora(0, "a")
    run(s, s.schedule())  # "a" runs and pins the only slot
    b, _, a2 = add_lora(1, "b"), add_lora(2, None), add_lora(3, "a")
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["0", "2", "3"]  # base and the resident adapter pass "b"
    assert list(s.waiting) == [b]  # "b" keeps its place at the head
    for q in (a, a2):
        s.finish(q)
    assert [q.request_id for q in s.schedule().seqs] == ["2", "1"]  # the slot drained: "b" is next


def test_a_request_waiting_for_a_lora_slot_is_not_starved_by_steady_traffic():
    """Requests for the resident adapter keep arriving, each running two steps, so its slot is never unpinned;
    after MAX_SLOT_WAITS steps they wait too (base requests still run), the pins drain and "b" gets the slot."""
    from llmaas.engine.scheduler import MAX_SLOT_WAITS

    cfg = EngineConfig(max_model_len=64, num_kv_blocks=256, block_size=4, max_num_batched_tokens=64, max_num_seqs=8,
                       max_loras=1)
    s = Scheduler(cfg, BlockManager(256, 4))
    arrivals = iter(range(10_000))
    since: dict[str, int] = {}

    def add_lora(lora: str | None) -> Sequence:
        i = next(arrivals)
        seq = Sequence(str(i), list(range(1000 * i, 1000 * i + 4)), SamplingParams(), arrival=i, lora=lora)
        s.add(seq)
        return seq

    first = add_lora("a")
    run(s, s.schedule())
    since[first.request_id] = -1
    b, admitted_b = add_lora("b"), None
    for step in range(MAX_SLOT_WAITS + 10):
        add_lora("a")  # steady traffic to the resident adapter
        base = add_lora(None)
        batch = s.schedule()
        run(s, batch)
        assert base in batch.seqs  # base requests are never held up
        if b in batch.seqs:
            admitted_b = step
            break
        for seq in batch.seqs:
            since.setdefault(seq.request_id, step)
        for seq in list(s.running):
            if since[seq.request_id] < step:  # ran two steps: done, its pin released
                s.finish(seq)
    assert admitted_b is not None and MAX_SLOT_WAITS <= admitted_b <= MAX_SLOT_WAITS + 3, admitted_b

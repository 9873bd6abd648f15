"""Iteration-level scheduling: who runs this step and with how many tokens. No torch here.

Each step spends a token budget: running sequences first (oldest first, one token
for a decode, a chunk for an unfinished prefill), then waiting sequences in FCFS
order, whose prompts may be split into chunks across steps (chunked prefill), so a
long prompt never stalls running streams. When KV blocks run out, the youngest
running sequence is preempted: its blocks are freed and it is recomputed later
(prompt plus the tokens it had generated), so no request fails on a full cache.
A waiting sequence whose next prompt block a batch-mate is computing this very step
waits one step and then reuses that block (n > 1 choices share their prompt's KV).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .config import EngineConfig
from .lora import SlotTable
from .sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens each sequence feeds through the model this step
    lora_loads: list[tuple[int, str]] = field(default_factory=list)  # (slot, adapter) to write before running

    def __len__(self) -> int:
        return len(self.seqs)


MAX_SLOT_WAITS = 32  # steps a request may be passed by others while it waits for a LoRA slot


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, slots: SlotTable | None = None) -> None:
        self.config = config
        self.block_manager = block_manager
        self.slots = slots or SlotTable(config.max_loras)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in arrival order, oldest first

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Removes the request wherever it is and frees its blocks at once."""
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._free(seq)
                    seq.status = SequenceStatus.FINISHED
                    return seq
        return None

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.FINISHED

    def _free(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        if seq.lora_slot is not None:
            self.slots.release(seq.lora)
            seq.lora_slot = None

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        # Running sequences, oldest first; victims of preemption come from the young end.
        queue = list(self.running)
        while queue and budget > 0:
            seq = queue.pop(0)
            num = min(seq.num_pending_tokens, budget)
            while not self.block_manager.can_allocate(seq, num):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.allocate(seq, num)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num)
                budget -= num
        # Waiting sequences, FCFS: a head that lacks KV blocks blocks the rest until it fits. One whose adapter
        # cannot get a LoRA slot (every slot pinned) keeps its place but lets the others pass: base requests and
        # requests for adapters already in slots are not held up behind another tenant's adapter. Once it has
        # waited MAX_SLOT_WAITS steps, later adapter requests wait too (base ones still pass), so the pins drain
        # and it gets a slot: no starvation under steady traffic to the resident adapters.
        inflight: set[int] | None = None  # hashes of blocks this batch completes (built on first need)
        no_slot: list[Sequence] = []
        starved = False
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.lora is not None and (starved or not self.slots.can_acquire(seq.lora)):
                if not self.slots.can_acquire(seq.lora):
                    seq.slot_waits += 1
                    starved |= seq.slot_waits > MAX_SLOT_WAITS
                no_slot.append(self.waiting.popleft())
                continue
            self.block_manager.match_prefix(seq)  # cached leading blocks count as computed
            wanted = self.block_manager.next_block_hash(seq)
            if wanted is not None:
                if inflight is None:
                    inflight = {h for s, n in zip(batch.seqs, batch.num_new_tokens)
                                for h in self.block_manager.pending_hashes(s, n)}
                if wanted in inflight:  # a batch-mate computes this block now (n > 1, a burst sharing a
                    self.block_manager.deallocate(seq)  # system prompt): wait one step and reuse it
                    break
            num = min(seq.num_pending_tokens, budget)
            if not self.block_manager.can_allocate(seq, num):
                self.block_manager.deallocate(seq)  # give the matched blocks back; it waits whole
                break
            if seq.lora is not None:
                seq.lora_slot, needs_load = self.slots.acquire(seq.lora)
                if needs_load:
                    batch.lora_loads.append((seq.lora_slot, seq.lora))
            self.waiting.popleft()
            if seq.num_cached_tokens is None:  # the first admission's reuse is the request's (usage); a
                seq.num_cached_tokens = seq.num_computed_tokens  # preempted one re-admitted is not counted again
                self.block_manager.num_cached_tokens += seq.num_computed_tokens
            self.block_manager.allocate(seq, num)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num)
            budget -= num
            if inflight is not None:
                inflight.update(self.block_manager.pending_hashes(seq, num))
        self.waiting.extendleft(reversed(no_slot))  # back at the head, in their order
        self.running.sort(key=lambda s: s.arrival)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # Back to the head of the queue: it keeps its place ahead of newer arrivals.
        self.waiting.appendleft(seq)

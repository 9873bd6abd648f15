"""Decode steps replayed from CUDA graphs: one graph per padded batch-size bucket (nano-vllm, vLLM).

A decode step of the CUDA path is ~10 kernels per layer: at small batches the GPU waits on the CPU to launch
them. Captured once per bucket, a step is one ``replay()``. A graph replays fixed addresses and shapes, so:

- every input lives in one persistent int32 device buffer (token ids, positions, cache slots, sequence
  lengths, adapter slots, block tables at the widest the context allows), filled each step from a pinned
  host buffer with ONE non-blocking copy of the part the step's bucket reads; the graph reads views of it;
  a table row is rewritten only when its sequence's table changed;
- a step of n sequences runs the smallest bucket >= n; padding rows write no cache (``PAD_SLOT_ID``), read one
  key and use no adapter, and their outputs are dropped;
- the output is the graph's static tensor: consumed (logits, sampling) before the next replay;
- the split-K factor is fixed per bucket, from the table width; LoRA runs in every graph when the engine has
  adapter slots (rows without one cost a skipped program), grouping rows by slot on the device inside it.

Prefill and mixed steps run eagerly. Without CUDA (a CPU rehearsal, the tests) ``EagerReplay`` stands in for
the graphs: the same buffers, buckets and static outputs, the step re-run at each replay.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from .kernels import paged_attention, sgmv
from .kernels.layers import PAD_SLOT_ID
from .lora import LoRAPool
from .triton_model import KernelLoRA, KernelMetadata, TritonCausalLM, cache_slot

FIELDS = ("ids", "positions", "slots", "seq_lens", "lora")  # per-row inputs, then the block tables


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Padded batch sizes with a graph: 1, 2, 4, 8, then every 16 (nano-vllm's), up to ``max_num_seqs``."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return small + list(range(16, max_num_seqs, 16)) + [max_num_seqs]


class Replayable(Protocol):
    def replay(self) -> None: ...


Capture = Callable[[Callable[[], torch.Tensor]], tuple[Replayable, torch.Tensor]]


class CudaGraphCapture:
    """Captures a step into a ``torch.cuda.CUDAGraph``; all graphs share one memory pool (largest first)."""

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, fn: Callable[[], torch.Tensor]) -> tuple[Replayable, torch.Tensor]:
        fn()  # warm-up: Triton compiles a kernel on its first launch, which a capture may not do
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        return graph, out


class EagerReplay:
    """Where there is no CUDA (a CPU rehearsal, the tests): ``replay()`` runs the captured step again over the
    same static inputs and writes the captured output tensor, as a graph replay would."""

    def __init__(self, step: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.step, self.out, self.replays = step, out, 0

    def replay(self) -> None:
        self.out.copy_(self.step())
        self.replays += 1


def eager_capture(step: Callable[[], torch.Tensor]) -> tuple[EagerReplay, torch.Tensor]:
    out = step()
    return EagerReplay(step, out), out


class DecodeGraphs:
    """Captured decode steps of a ``TritonCausalLM`` and the static buffers they read."""

    def __init__(self, model: TritonCausalLM, kv_cache: Any, pool: LoRAPool | None, max_num_seqs: int,
                 max_blocks: int, capture: Capture | None = None) -> None:
        self.model, self.kv_cache, self.pool = model, kv_cache, pool
        self.buckets = batch_buckets(max_num_seqs)
        self.rows, self.width = self.buckets[-1], max_blocks
        device = model.cos.device
        size = len(FIELDS) * self.rows + self.rows * self.width
        # int32 (token ids, positions, slots and block ids all fit): half the bytes of each step's copy
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=device.type == "cuda")  # [size]
        self.static = torch.zeros(size, dtype=torch.int32, device=device)  # [size], what the graphs read
        # the copy out of ``host`` is asynchronous: the next step waits for it before writing ``host`` again
        self._copied = torch.cuda.Event() if device.type == "cuda" else None
        self._host_views = self._views(self.host)
        self._rows = self.host[:len(FIELDS) * self.rows].view(len(FIELDS), self.rows)  # [fields, rows]
        self._written: list[list[int]] = [[] for _ in range(self.rows)]  # block table last written to each row
        self._static_views = self._views(self.static)
        self.scales = torch.zeros(len(pool.scale) if pool else 0, dtype=torch.float32, device=device)  # [slots]
        self._scales_seen: list[float] = []
        self._pad(0, self.rows)
        self.static.copy_(self.host)
        capture = capture or (CudaGraphCapture() if device.type == "cuda" else eager_capture)
        self.graphs: dict[int, Replayable] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> [bucket, hidden], the graph's static output
        for bucket in reversed(self.buckets):  # largest first: smaller graphs reuse its memory
            self.graphs[bucket], self.outputs[bucket] = capture(self._step(bucket))
        self.num_replays = 0

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        n = self.rows
        views = {name: buf[i * n:(i + 1) * n] for i, name in enumerate(FIELDS)}  # each [rows]
        views["tables"] = buf[len(FIELDS) * n:].view(n, self.width)  # [rows, max_blocks]
        return views

    def _step(self, bucket: int) -> Callable[[], torch.Tensor]:
        v = self._static_views
        meta = KernelMetadata(
            slot_mapping=v["slots"][:bucket], block_tables=v["tables"][:bucket], seq_lens=v["seq_lens"][:bucket],
            cu_seqlens_q=torch.arange(bucket + 1, dtype=torch.int32, device=self.static.device),
            max_query_len=1, num_splits=paged_attention.choose_num_splits(
                bucket, self.model.num_kv_heads, self.width, self.model.num_sms))
        num_slots = len(self.pool.scale) if self.pool else 0

        def step() -> torch.Tensor:
            lora = KernelLoRA(sgmv.plan_tokens(v["lora"][:bucket], num_slots), self.scales) if self.pool else None
            return self.model(v["ids"][:bucket], v["positions"][:bucket], meta, self.kv_cache, lora, self.pool)
        return step

    def _pad(self, start: int, end: int) -> None:
        """Host rows [start, end) as padding: no cache write, one key read, no adapter."""
        h = self._host_views
        h["ids"][start:end] = 0
        h["positions"][start:end] = 0
        h["slots"][start:end] = PAD_SLOT_ID
        h["seq_lens"][start:end] = 1
        h["lora"][start:end] = sgmv.NO_ADAPTER

    def bucket_for(self, num_seqs: int) -> int | None:
        """The smallest bucket holding ``num_seqs`` rows; None when the step is too big for any graph."""
        return next((b for b in self.buckets if b >= num_seqs), None)

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        """Whether a decode step of ``num_seqs`` sequences of up to ``num_blocks`` blocks has a graph."""
        return num_seqs <= self.rows and num_blocks <= self.width

    def run(self, ids: list[int], positions: list[int], block_tables: list[list[int]],
            lora_slots: list[int | None], block_size: int) -> torch.Tensor:
        """One decode step (sequence i's new token ``ids[i]`` at ``positions[i]``). Returns [n, hidden], a view of
        the graph's static output, valid until the next ``run``."""
        bucket = self.prepare(ids, positions, block_tables, lora_slots, block_size)
        self.graphs[bucket].replay()
        self.num_replays += 1
        return self.outputs[bucket][:len(ids)]

    def prepare(self, ids: list[int], positions: list[int], block_tables: list[list[int]],
                lora_slots: list[int | None], block_size: int) -> int:
        """Fills the static inputs for a decode step and returns the bucket whose graph runs it.

        The host buffer is reused each step: the caller has synchronised on the previous step's result (its
        sampled tokens), so its copy has landed.
        """
        n = len(ids)
        bucket = self.bucket_for(n)
        if bucket is None or not self.fits(n, max(len(t) for t in block_tables)):
            raise ValueError(f"no decode graph for {n} sequences of up to {self.width} blocks")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read ``host`` (usually long since)
        slots = [cache_slot(t, p, block_size) for t, p in zip(block_tables, positions)]
        loras = [sgmv.NO_ADAPTER if slot is None else slot for slot in lora_slots]
        self._rows[[0, 1, 2, 4], :n] = torch.tensor([ids, positions, slots, loras], dtype=torch.int32)  # 3: seq_lens
        self._rows[3, :n] = self._rows[1, :n] + 1  # seq_lens
        tables = self._host_views["tables"]
        for i, table in enumerate(block_tables):  # a row is rewritten only when its table changed: a block is
            if self._written[i] != table:  # appended every block_size tokens, so most rows keep theirs
                tables[i, :len(table)] = torch.tensor(table, dtype=torch.int32)
                self._written[i] = list(table)
        self._pad(n, bucket)
        used = len(FIELDS) * self.rows + bucket * self.width  # the per-row fields, then the bucket's table rows
        self.static[:used].copy_(self.host[:used], non_blocking=True)  # the step's one host -> device copy
        if self._copied is not None:
            self._copied.record()
        if self.pool is not None and self.pool.scale != self._scales_seen:  # only when adapters changed
            self._scales_seen = list(self.pool.scale)
            self.scales.copy_(torch.tensor(self._scales_seen, dtype=torch.float32))
        return bucket

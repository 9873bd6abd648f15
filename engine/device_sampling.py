"""Sampling for the CUDA path: the rows' parameters live in one persistent device buffer, and one kernel
launch samples every row (``kernels/sampling.py``: no vocabulary sort, counter-based draws).

The host keeps the batch's parameters in a pinned int32 buffer [7, rows], copied to the device with one
non-blocking copy when they change. The per-request part (temperature, top-p, min-p, top-k, seed) is packed
once, when the request arrives, and rewritten into the buffer only when the batch's rows changed. The step
counters advance on the device: the kernel adds one to each row's after drawing, so a decode step of the same
rows, each one token further (checked on the host), copies nothing for sampling. The step's one device -> host
read is the sampled tokens.

A row's draws are Philox's, keyed by its seed and counted by its step (the tokens it has generated): a seeded
request gets the same tokens whatever shares its batch, and after a preemption recomputes it, the same draws.
A request without a seed gets a random one when it arrives. (The CPU path draws from per-request
``torch.Generator``s instead: the two paths give different tokens for the same seed.)
"""
from __future__ import annotations

import secrets
import struct

import torch

from .kernels import sampling
from .sampling_params import SamplingParams
from .sequence import Sequence

ALL_TOKENS = (1 << 31) - 1  # top-k of a row that keeps every token (int32)


def pack(params: SamplingParams, seed: int) -> tuple[int, ...]:
    """A request's columns of the parameter buffer but the step: (temperature, top-p, min-p as float32 bits,
    top-k, seed low and high halves), each an int32."""
    bits = struct.unpack("<3i", struct.pack("<3f", params.temperature, params.top_p, params.min_p))
    seed &= (1 << 64) - 1
    lo, hi = struct.unpack("<2i", struct.pack("<2I", seed & 0xFFFFFFFF, seed >> 32))
    return (*bits, min(params.top_k or ALL_TOKENS, ALL_TOKENS), lo, hi)


class DeviceSampler:
    """Samples a step's rows on the device from persistent parameter buffers."""

    def __init__(self, max_rows: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._packed: dict[str, tuple[int, ...]] = {}  # request id -> its columns
        self.num_rewrites = 0  # steps whose rows changed (their parameters were rewritten)
        self.num_copies = 0  # steps that copied the buffer to the device
        self._allocate(max_rows)

    def _allocate(self, rows: int) -> None:
        cuda = self.device.type == "cuda"
        self.rows = rows
        self.host = torch.zeros(len(sampling.PARAMS), rows, dtype=torch.int32, pin_memory=cuda)  # [7, rows]
        self.static = torch.zeros(len(sampling.PARAMS), rows, dtype=torch.int32, device=self.device)
        self.tokens = torch.zeros(rows, dtype=torch.int32, device=self.device)  # [rows], the kernel's output
        self.rounds = torch.zeros(rows, dtype=torch.int32, device=self.device)  # [rows], its rounds per row
        self._copied = torch.cuda.Event() if cuda else None  # the next step waits for the copy out of ``host``
        self._columns: list[str] = []  # the request whose parameters each host column holds
        self._device_steps: list[int] = [0] * rows  # the step counters the device buffer holds (the kernel adds 1)

    def add(self, seq: Sequence) -> tuple[int, ...]:
        """Packs a new request's parameters (with a random seed when it has none); returns its columns."""
        seed = seq.params.seed if seq.params.seed is not None else secrets.randbits(64)
        packed = self._packed[seq.request_id] = pack(seq.params, seed)
        if seq.request_id in self._columns:  # a request id used again: its old columns are stale
            self._columns = []
        return packed

    def drop(self, request_id: str) -> None:
        self._packed.pop(request_id, None)

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row. logits: [R, V] (penalties, biases and masks applied) for ``seqs``.
        Returns: Shape: [R] int32 on the device, a view of the persistent output: read it (the step's one
        sync) before the next call."""
        n = len(seqs)
        if n > self.rows:  # more rows than the engine schedules at once: never, but not an error
            self._allocate(n)
        elif self._copied is not None:
            self._copied.synchronize()  # the last copy has read ``host`` (long since: its tokens were read)
        ids = [seq.request_id for seq in seqs]
        steps = [len(seq.output_token_ids) for seq in seqs]
        moved = ids != self._columns[:n]
        if moved:
            packed = [self._packed.get(seq.request_id) or self.add(seq) for seq in seqs]
            self.host[:6, :n] = torch.tensor(packed, dtype=torch.int32).T
            self._columns[:n] = ids
            self.num_rewrites += 1
        if moved or steps != self._device_steps[:n]:  # else: a decode step of the same rows,
            self._device_steps[:n] = steps  # each one token further, whose counters the kernel already moved
            self.host[6] = torch.tensor(self._device_steps, dtype=torch.int32)
            self.static.copy_(self.host, non_blocking=True)  # 7 x rows int32, when the rows or their steps moved
            self.num_copies += 1
            if self._copied is not None:
                self._copied.record()
        self._device_steps[:n] = [-1] * n  # unknown until the launch returns: a launch that raises forces a copy
        tokens = sampling.sample_rows(logits, self.static, self.tokens[:n], self.rounds[:n], count_steps=True)
        self._device_steps[:n] = [step + 1 for step in steps]
        return tokens

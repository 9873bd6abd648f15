"""Which float dtype runs fastest on this CPU, decided by timing it, never by CPU flags.

The same flags (AVX512-BF16) mean bf16 GEMMs at ~4x fp32 on one AMD EPYC and at
~0.56x on an Intel Xeon: only a measurement tells. The probe times one projection
of a small LLM's shape (a batch of 64 rows) in fp32 and bf16, interleaved, and
picks bf16 only when it is clearly faster (fp32 keeps token-exact parity with
transformers). ~0.3 s, once per process; `benchmarks/engine_throughput` measures
the whole engine in both dtypes.
"""
from __future__ import annotations

import functools
import time

import torch

BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much: below it, exact fp32 parity is worth more than noise


def choose(fp32_s: float, bf16_s: float) -> torch.dtype:
    """The dtype to run given the seconds one probe GEMM took in each."""
    return torch.bfloat16 if fp32_s / bf16_s >= BF16_MIN_SPEEDUP else torch.float32


def linear_timer(dtype: torch.dtype, rows: int = 64, features: tuple[int, int] = (576, 1536), reps: int = 20):
    """A function timing one ``rows x in -> out`` linear in ``dtype`` (SmolLM2-135M's MLP shape), in seconds."""
    x = torch.randn(rows, features[0]).to(dtype)
    w = torch.randn(features[1], features[0]).to(dtype)
    for _ in range(2):  # warm: the first calls pick and pack kernels
        torch.nn.functional.linear(x, w)

    def seconds() -> float:
        start = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, w)
        return (time.perf_counter() - start) / reps
    return seconds


@functools.cache
def fastest_cpu_dtype(threads: int | None = None, rounds: int = 7) -> torch.dtype:
    """fp32 or bf16, whichever this CPU runs faster at ``threads`` torch threads (cached per process)."""
    del threads  # part of the cache key only: the caller has set torch's thread count already
    timers = {dtype: linear_timer(dtype) for dtype in (torch.float32, torch.bfloat16)}
    runs: dict[torch.dtype, list[float]] = {dtype: [] for dtype in timers}
    for _ in range(rounds):  # interleaved, and the fastest round of each: background load only ever slows a run
        for dtype, seconds in timers.items():
            runs[dtype].append(seconds())
    return choose(min(runs[torch.float32]), min(runs[torch.bfloat16]))

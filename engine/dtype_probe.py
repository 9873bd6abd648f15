"""Which float dtype runs fastest on this CPU, decided by timing it, never by CPU flags.

The same flags (AVX512-BF16) mean bf16 GEMMs at ~4x fp32 on one AMD EPYC and at
~0.56x on an Intel Xeon: only a measurement tells. The probe times one projection
of a small LLM's shape (a batch of 64 rows) in fp32 and bf16, interleaved, and
picks bf16 only when it is clearly faster (fp32 keeps token-exact parity with
transformers). ~0.3 s, once per process; `benchmarks/engine_throughput` measures
the whole engine in both dtypes.

A quantized model's GEMMs are not dense GEMMs in the compute dtype: the kernel plan
runs them packed, with bf16 activations where that is faster, in either compute
dtype, so the dense probe answers the wrong question. On the AMD EPYC where dense
bf16 is 2.7x fp32, the default model's int4 single stream ran 34.3 tok/s in bf16 and
41.7 in fp32. For those, ``fastest_quantized_dtype`` times what the engine runs: one
decoder layer of the model's own shape, quantized the same way, through the engine
(its kernel plan calibrated for each dtype), decode steps at 1 and 16 sequences.
"""
from __future__ import annotations

import functools
import logging
import time

import torch

logger = logging.getLogger(__name__)

BF16_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much: below it, exact fp32 parity is worth more than noise


def choose(fp32_s: float, bf16_s: float) -> torch.dtype:
    """The dtype to run given the seconds one probe GEMM took in each."""
    return torch.bfloat16 if fp32_s / bf16_s >= BF16_MIN_SPEEDUP else torch.float32


def speedup_dtype(fp32_s: list[float], bf16_s: list[float]) -> torch.dtype:
    """``choose`` over several workloads: the geometric mean of their fp32 / bf16 time ratios."""
    ratio = 1.0
    for f, b in zip(fp32_s, bf16_s, strict=True):
        ratio *= f / b
    return choose(ratio ** (1 / len(fp32_s)), 1.0)


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


PROBE_BATCHES = (1, 16)  # decode sequences per probed step: a single stream and a loaded replica
PROBE_LAYERS = 4  # decoder layers in the probed copy: enough that a step's fixed cost does not dilute the ratio


def probe_batches(max_num_seqs: int) -> tuple[int, ...]:
    """PROBE_BATCHES as this engine can run them (no more sequences than it admits)."""
    return tuple(dict.fromkeys(min(b, max_num_seqs) for b in PROBE_BATCHES))


def layer_timer(model_path: str, dtype: torch.dtype, quantization: str, group_size: int,
                kernel_cache_file: str | None = None, max_num_seqs: int = max(PROBE_BATCHES), steps: int = 4):
    """A function timing decode steps of a copy of ``model_path``'s architecture cut to its first PROBE_LAYERS
    layers (random weights, a 256-token vocabulary: the layers' cost, not the LM head's; short contexts),
    quantized as asked, through the engine, at each of ``probe_batches``; returns seconds per step at each.
    Leaves torch's global RNG (the requests') as it found it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .config import EngineConfig
    from .llm_engine import LLMEngine
    from .sampling_params import SamplingParams

    config = AutoConfig.from_pretrained(model_path)
    layers = min(PROBE_LAYERS, config.num_hidden_layers)
    config.num_hidden_layers, config.vocab_size = layers, 256
    if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding windows)
        config.layer_types = config.layer_types[:layers]
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, attr, None)
    batches = probe_batches(max_num_seqs)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    engine = LLMEngine(model, EngineConfig(
        max_model_len=64, max_num_seqs=max(batches), num_kv_blocks=2 * max(batches) * 4, dtype=dtype,
        quantization=quantization, quant_group_size=group_size, kernel_cache_file=kernel_cache_file,
        enable_prefix_caching=False))
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    runs = 0

    def seconds() -> list[float]:
        nonlocal runs
        out = []
        for batch in batches:
            for _ in range(batch):
                runs += 1
                engine.add_request(f"probe-{runs}", [(7 * runs + j) % 256 for j in range(8)], params)
            engine.step()  # the prompts
            engine.step()  # the first decode step warms this batch size
            start = time.perf_counter()
            for _ in range(steps):
                engine.step()
            out.append((time.perf_counter() - start) / steps)
            while engine.has_unfinished():
                engine.step()
        return out
    return seconds


@functools.cache
def fastest_quantized_dtype(model_path: str, quantization: str, group_size: int, threads: int | None = None,
                            kernel_cache_file: str | None = None, max_num_seqs: int = max(PROBE_BATCHES),
                            rounds: int = 5) -> torch.dtype:
    """fp32 or bf16 for a quantized model, by timing its first layers as the engine runs them (cached per
    process; the kernel plans it measures are kept in ``kernel_cache_file`` like the engine's own)."""
    del threads  # part of the cache key only
    timers = {dtype: layer_timer(model_path, dtype, quantization, group_size, kernel_cache_file, max_num_seqs)
              for dtype in (torch.float32, torch.bfloat16)}
    batches = probe_batches(max_num_seqs)
    best = {dtype: [float("inf")] * len(batches) for dtype in timers}
    for _ in range(rounds):  # interleaved; the fastest round of each batch size
        for dtype, seconds in timers.items():
            best[dtype] = [min(a, b) for a, b in zip(best[dtype], seconds())]
    chosen = speedup_dtype(best[torch.float32], best[torch.bfloat16])
    logger.info("dtype probe (%s, %d layers, decode batches %s): fp32 %s ms, bf16 %s ms per step -> %s",
                quantization, PROBE_LAYERS, batches, [round(s * 1e3, 2) for s in best[torch.float32]],
                [round(s * 1e3, 2) for s in best[torch.bfloat16]], chosen)
    return chosen

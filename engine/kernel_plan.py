"""Which kernel runs each quantized projection: measured per weight shape and batch size, kept per machine.

Candidates are QuantizedLinear.kernels() (torch's packed int8 / int4 CPU kernels with compute-dtype or bf16
activations, dequantize + GEMM). On one 2-core Xeon (AMX) the packed int4 kernel took 25 us at M = 1 and 2.5 ms
at M = 256 for a 1536 x 576 weight, dequantize + GEMM 0.8 and 1.0 ms: the answer flips with M, and with the CPU,
so it is timed at engine start (~1-2 s for SmolLM2's shapes) and cached in a JSON file. A kernel that cannot
run here (an op this CPU or torch build lacks, at any size) is dropped, never fatal.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .quantization import M_BUCKETS, Kernel, QuantizedLinear, called_modules

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Calibration:
    plans: dict[str, tuple[str, ...]]  # shape_key -> kernel name per M bucket
    seconds: float  # time the measurement took (0 when read from the cache)


def machine_key(dtype: torch.dtype, device: torch.device) -> str:
    """What a cached calibration is valid for: CPU model and the instruction set torch uses on it, torch build,
    threads, compute dtype, device (the CPU's name alone can be as generic as "Intel(R) Xeon(R) Processor")."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}|{dtype}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}|{torch.backends.cpu.get_cpu_capability()}|torch {torch.__version__}|"
            f"threads {torch.get_num_threads()}|{dtype}")


def _seconds(kernel: Kernel, x: torch.Tensor, budget_s: float = 0.004) -> float:
    """Fastest of a few timed calls (background load only ever slows a call); a CUDA call is timed to its end."""
    sync = torch.cuda.synchronize if x.is_cuda else lambda: None
    kernel(x)  # warm: packs, caches, picks oneDNN primitives, compiles Triton kernels
    sync()
    best = float("inf")
    spent = 0.0
    for _ in range(5):
        start = time.perf_counter()
        kernel(x)
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:
            break
    return best


def _run_or_drop(kernels: dict[str, Kernel], name: str, shape_key: str, rows: int,
                 call: Callable[[], float]) -> float | None:
    """``call()`` for kernel ``name``; when it raises (an op this CPU or torch build lacks, at all or at this many
    rows; a Triton kernel this GPU cannot compile) the kernel is dropped from ``kernels`` and None returned. The
    reference's failure is fatal."""
    try:
        return call()
    except Exception as exc:  # any candidate's failure only drops it (Triton's errors are not RuntimeErrors)
        if name == "dequant":
            raise
        logger.warning("quantized kernel %s cannot run %d rows of %s: %s", name, rows, shape_key, exc)
        del kernels[name]
        return None


def measure_plan(module: QuantizedLinear, prune: float = 4.0) -> tuple[str, ...]:
    """Times each of ``module``'s kernels at every M bucket; a packed kernel ``prune`` x slower than the best at
    one bucket is not timed at larger ones (they only fall further behind as M grows; with fp32 activations one
    took 1.4 s at M = 64 on the LM head), dequantize + GEMM always is (it is slowest at small M and the fastest
    at large M). A kernel whose output disagrees with the dequantized reference is dropped."""
    kernels = module.kernels()
    if len(kernels) == 1:  # nothing to choose
        return (next(iter(kernels)),) * len(M_BUCKETS)
    gen = torch.Generator(device=module.qweight.device).manual_seed(0)  # the global RNG is the requests'
    probe = torch.randn(4, module.in_features, generator=gen, device=module.qweight.device).to(module.dtype)
    reference = kernels["dequant"](probe).float()
    tol = 2e-2 * reference.abs().max().item() + 1e-3
    for name in [n for n in kernels if n != "dequant"]:
        error = _run_or_drop(kernels, name, module.shape_key, len(probe),
                             lambda: (kernels[name](probe).float() - reference).abs().max().item())
        if error is not None and error > tol:
            logger.warning("quantized kernel %s disagrees with the reference on %s: not used", name, module.shape_key)
            del kernels[name]
    plan: list[str] = []
    for m in M_BUCKETS:
        x = torch.randn(m, module.in_features, generator=gen, device=module.qweight.device).to(module.dtype)
        times = {}
        for name, kernel in list(kernels.items()):  # a kernel failing at this size is dropped for larger ones too
            took = _run_or_drop(kernels, name, module.shape_key, m, lambda: _seconds(kernel, x))
            if took is not None:
                times[name] = took
        best = min(times, key=times.__getitem__)
        plan.append(best)
        kernels = {n: k for n, k in kernels.items() if n.startswith("dequant") or times[n] <= prune * times[best]}
    return tuple(plan)


@dataclass(frozen=True, slots=True)
class _Cached:
    plan: tuple[str, ...]
    candidates: frozenset[str]  # the kernels offered when it was measured: a new one (new code) re-measures


def _read_cache(path: Path | None, key: str) -> dict[str, _Cached]:
    if path is None or not path.is_file():
        return {}
    try:
        entry = json.loads(path.read_text()).get(key, {})
        return {shape: _Cached(tuple(e["plan"]), frozenset(e["candidates"])) for shape, e in entry.items()
                if isinstance(e, dict) and len(e.get("plan", ())) == len(M_BUCKETS)}  # older formats: measured anew
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        return {}


def _write_cache(path: Path, key: str, plans: dict[str, _Cached]) -> None:
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[key] = {**data.get(key, {}), **{shape: {"plan": list(c.plan), "candidates": sorted(c.candidates)}
                                         for shape, c in plans.items()}}
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".kernels-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: replicas starting together never read half a file
    except OSError as exc:  # a cache that cannot be written costs the next start a measurement, nothing more
        logger.warning("kernel plan not cached at %s: %s", path, exc)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def calibrate(model: nn.Module, dtype: torch.dtype, cache_file: str | None = None) -> Calibration:
    """Gives every QuantizedLinear in ``model`` the engine calls (not the parts of a fused one: those keep
    dequantize + GEMM for transformers' own forward) its measured kernel per M bucket: one measurement per weight
    shape, on that shape's first module; read from ``cache_file`` when it holds this machine's, measured with the
    kernels offered now (a kernel added since is measured)."""
    modules = called_modules(model)
    if not modules:
        return Calibration({}, 0.0)
    by_shape: dict[str, QuantizedLinear] = {}
    for m in modules:
        by_shape.setdefault(m.shape_key, m)
    path = Path(cache_file) if cache_file else None
    key = machine_key(dtype, modules[0].qweight.device)
    cached = _read_cache(path, key)
    offered = {s: frozenset(m.kernels()) for s, m in by_shape.items()}
    start = time.perf_counter()
    missing = [s for s in by_shape if s not in cached or cached[s].candidates != offered[s]]
    with torch.inference_mode():
        measured = {s: _Cached(measure_plan(by_shape[s]), offered[s]) for s in missing}
    seconds = time.perf_counter() - start if missing else 0.0
    plans = {s: (measured.get(s) or cached[s]).plan for s in by_shape}
    if missing:
        logger.info("quantized kernels measured in %.2f s: %s", seconds, {s: plans[s] for s in missing})
        if path is not None:
            _write_cache(path, key, measured)
    for m in modules:
        kernels = m.kernels()
        m.use(tuple(kernels[name] for name in plans[m.shape_key]))
    return Calibration({s: plans[s] for s in by_shape}, seconds)

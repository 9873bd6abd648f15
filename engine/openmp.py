"""One OpenMP thread pool in the process, so the engine thread steps as fast as a main-thread loop.

libgomp (torch's OpenMP on Linux) keeps a pool of worker threads for every thread
that has run a parallel region, and counts all their workers as "managed threads".
Once those outnumber the CPUs, every worker spins only 100 rounds at a barrier before
it sleeps on a futex (libgomp's throttled spin), so each of the hundreds of parallel
regions in a decode step pays futex wake-ups. A model loaded (and probed, warmed) on
one thread and stepped on another is that case: two pools, three managed threads on
two CPUs. Measured on a 2-core Intel Xeon, default model, bf16, one request of
128 prompt / 64 generated tokens: 10.6 tok/s stepping on a second thread while the
loading thread's pool lived, 18-20 tok/s once it was freed (16-17 for the same loop
on the main thread with only its own pool).

``release_pool()`` frees the calling thread's pool through OpenMP 5's
``omp_pause_resource_all``, which libgomp implements as "free this thread's pool";
its workers exit and the next parallel region on that thread builds a new one.
"""
from __future__ import annotations

import ctypes
import sys

_OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: libgomp frees the calling thread's pool for either kind


_pauses: dict[str, object] = {}  # path -> omp_pause_resource_all, of every libgomp seen loaded


def _libgomp_pauses() -> list:
    """omp_pause_resource_all of every libgomp this process has loaded (torch's own copy, and any other a
    library brought), looked up once each; empty off Linux or where none is loaded yet."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return []
    for path in paths - _pauses.keys():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all  # already mapped: dlopen hands back that copy
        except (OSError, AttributeError):  # libgomp before GCC 10 has no pause
            _pauses[path] = None
            continue
        pause.argtypes = [ctypes.c_int]
        pause.restype = ctypes.c_int
        _pauses[path] = pause
    return [pause for path, pause in _pauses.items() if pause is not None and path in paths]


def release_pool() -> bool:
    """Frees the calling thread's OpenMP worker pools (in every libgomp loaded); False where none could be
    (no libgomp, or inside a parallel region). Harmless when the thread has no pool."""
    pauses = _libgomp_pauses()
    return bool(pauses) and all(pause(_OMP_PAUSE_SOFT) == 0 for pause in pauses)

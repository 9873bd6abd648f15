"""The engine thread is the only OpenMP pool left: the thread that built the async front hands its pool back.

Run in a fresh interpreter: which threads hold libgomp pools is process state that other tests change.
Counted through /proc/self/task (one OS thread per pool worker).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, os, time
    import torch
    from llmaas.engine import AsyncLLMEngine, EngineConfig, LLMEngine, openmp
    from tests.models import tiny_llama

    def threads():
        return len(os.listdir("/proc/self/task"))

    def settle(target, timeout=10.0):  # pool workers exit a moment after they are released
        end = time.monotonic() + timeout
        while threads() != target and time.monotonic() < end:
            time.sleep(0.01)
        return threads()

    torch.set_num_threads(2)
    base = threads()
    torch.randn(512, 512) @ torch.randn(512, 512)  # a parallel region on this thread: its pool, one worker
    with_pool = threads()
    released = openmp.release_pool()
    after_release = settle(base)
    torch.randn(512, 512) @ torch.randn(512, 512)
    engine = LLMEngine(tiny_llama(), EngineConfig(max_model_len=64, num_kv_blocks=16, block_size=8))
    before_front = threads()
    front = AsyncLLMEngine(engine)
    after_front = settle(base)
    front.shutdown()
    print(json.dumps(dict(base=base, with_pool=with_pool, released=released, after_release=after_release,
                          before_front=before_front, after_front=after_front)))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp and /proc are Linux's")
def test_building_the_async_front_frees_this_threads_openmp_pool():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["with_pool"] == seen["base"] + 1, seen  # the control: a matmul on two threads made a pool
    assert seen["released"] is True, seen
    assert seen["after_release"] == seen["base"], seen
    assert seen["before_front"] == seen["base"] + 1, seen
    assert seen["after_front"] == seen["base"], seen  # the loading thread's worker is gone

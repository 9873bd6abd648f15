from __future__ import annotations

import asyncio
import copy
import time

import pytest

from llmaas.engine import AsyncLLMEngine, EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from tests.models import tiny_llama

PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def make(model, gather_s: float = 0.0) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64,
                                                                        block_size=8)), gather_s=gather_s)


async def all_freed(engine: AsyncLLMEngine, timeout_s: float = 4.0) -> bool:
    """Whether the engine runs nothing and holds no KV block, within ``timeout_s`` (aborts land between steps)."""
    for _ in range(int(timeout_s / 0.02)):
        if engine.engine.num_running == 0 and engine.engine.block_manager.num_free_blocks == 64:
            return True
        await asyncio.sleep(0.02)
    return False


def test_concurrent_streams_equal_offline_generate(model):
    prompts = [[1, 2, 3], [5] * 20, [7, 8]]
    expected = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64)).generate(
        prompts, PARAMS)
    engine = make(model)

    async def one(i: int) -> list[int]:
        tokens = []
        async for out in engine.generate(f"r{i}", prompts[i], PARAMS):
            tokens.extend(out.new_token_ids)
        return tokens

    async def main():
        return await asyncio.gather(*(one(i) for i in range(3)))

    assert asyncio.run(main()) == expected
    engine.shutdown()


def test_closing_the_stream_aborts_and_frees_blocks(model):
    engine = make(model)

    async def main():
        stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        await stream.__anext__()
        await stream.aclose()
        return await all_freed(engine)

    assert asyncio.run(main())
    engine.shutdown()


def test_invalid_request_raises_before_streaming(model):
    engine = make(model)

    async def main():
        async for _ in engine.generate("bad", [], PARAMS):
            pass

    with pytest.raises(InvalidRequestError):
        asyncio.run(main())
    engine.shutdown()


def test_dead_engine_loop_fails_streams_and_health(model):
    from llmaas.engine import EngineDeadError

    engine = make(model)

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")

    engine.engine.step = broken_step  # the loop's next step dies

    async def main():
        async for _ in engine.generate("r", [1, 2, 3], PARAMS):
            pass

    with pytest.raises(EngineDeadError, match="illegal memory access"):
        asyncio.run(main())
    with pytest.raises(EngineDeadError):
        engine.check_health()


def test_an_adapter_evicted_in_the_same_pass_as_a_request_using_it_serves_that_request(model, tmp_path):
    """Serve's LRU can evict a version right after handing its lease to a request: the request's add and the
    removal then reach the engine thread in one pass. The request must run on the adapter, the removal wait."""
    import time

    from tests.models import make_peft_adapter

    engine = AsyncLLMEngine(LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64,
                                                                         block_size=8, max_loras=2)))
    path = make_peft_adapter(model, tmp_path / "a", seed=1)

    async def main():
        await engine.add_lora("x@1", path)
        blocker = asyncio.ensure_future(engine.call(lambda: time.sleep(0.5)))  # holds the engine thread
        await asyncio.sleep(0.1)
        stream = engine.generate("r", [1, 2, 3], PARAMS, lora="x@1")
        first = asyncio.ensure_future(stream.__anext__())  # the request's add is queued first ...
        await asyncio.sleep(0)
        removal = asyncio.ensure_future(engine.remove_lora("x@1"))  # ... then the eviction, same pass
        tokens = list((await first).new_token_ids)
        async for out in stream:
            tokens.extend(out.new_token_ids)
        await asyncio.gather(blocker, removal)
        for _ in range(100):  # the removal waited for the request, then happened
            if not engine.engine.has_lora("x@1"):
                return tokens
            await asyncio.sleep(0.02)
        raise AssertionError("the adapter was never removed")

    assert len(asyncio.run(main())) == PARAMS.max_tokens
    engine.shutdown()


def test_interval_batches_deltas_but_never_holds_the_first_or_the_last(model):
    """None: the first delta, then the whole rest in one message; a long interval never delays the finish."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64)).generate(
        [[1, 2, 3]], params)[0]
    engine = make(model)

    async def run(interval):
        messages = []
        async for out in engine.generate(f"r{interval}", [1, 2, 3], params, interval_s=interval):
            messages.append(out.new_token_ids)
        return messages

    async def main():
        whole = await asyncio.wait_for(run(None), 60)
        held = await asyncio.wait_for(run(3600.0), 60)  # finishes long before the interval is up
        each = await asyncio.wait_for(run(0.0), 60)
        return whole, held, each

    whole, held, each = asyncio.run(main())
    engine.shutdown()
    # at most two: the first delta may already hold every token that queued before the loop woke
    assert len(whole) <= 2 and sum(whole, []) == expected
    assert len(held) <= 2 and sum(held, []) == expected
    assert sum(each, []) == expected


@pytest.mark.parametrize("interval", [None, 3600.0])
def test_cancelling_a_held_stream_aborts_the_request(model, interval):
    engine = make(model)
    engine.engine.fault_hook = lambda stage, request_id: time.sleep(0.005)  # 200 tokens take > 1 s

    async def main():
        stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                                 interval_s=interval)
        await stream.__anext__()
        waiting = asyncio.ensure_future(stream.__anext__())  # held until the request's end
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await stream.aclose()
        return await all_freed(engine)

    assert asyncio.run(main())
    assert engine.engine.num_aborted == 1  # ended by the cancel, not by running out of tokens
    engine.shutdown()


def test_a_second_event_loop_gets_an_error_not_a_hang(model):
    engine = make(model)

    async def first():
        async for _ in engine.generate("a", [1, 2, 3], PARAMS):
            pass

    async def second():
        async for _ in engine.generate("b", [1, 2, 3], PARAMS):
            pass

    asyncio.run(first())
    with pytest.raises(RuntimeError, match="event loop it started on"):
        asyncio.run(asyncio.wait_for(second(), 30))
    engine.shutdown()


@pytest.mark.parametrize("gather_s", [0.0, 0.2])
def test_an_idle_engine_gathers_a_burst_into_its_first_step(model, gather_s):
    """Four requests 50 ms apart wake an idle engine: without gathering the first prefill runs without the
    last (it waits for a later step); gathering 200 ms gaps, all four are in the first step. Either way each
    request's tokens are what offline generate gives."""
    prompts = [[1, 2, 3 + i] for i in range(4)]
    expected = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64)).generate(
        prompts, PARAMS)
    engine = make(model, gather_s)
    steps: list[set[str]] = []
    step = engine.engine.step

    def recorded_step():  # the real step; which requests each one ran
        outputs = step()
        steps.append({o.request_id for o in outputs})
        return outputs

    engine.engine.step = recorded_step

    async def one(i: int) -> list[int]:
        await asyncio.sleep(0.05 * i)
        return [t async for out in engine.generate(f"r{i}", prompts[i], PARAMS) for t in out.new_token_ids]

    async def main():
        await engine.call(lambda: None)  # the engine thread is up and idle (a call is not a burst)
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 60)

    assert asyncio.run(main()) == expected
    engine.shutdown()
    if gather_s:
        assert steps[0] == {"r0", "r1", "r2", "r3"}, steps[:4]
    else:
        assert "r0" in steps[0] and "r3" not in steps[0], steps[:4]

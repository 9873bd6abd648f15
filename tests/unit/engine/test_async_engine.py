from __future__ import annotations

import asyncio
import copy

import pytest

from llmaas.deployments.engine import AsyncLLMEngine, EngineConfig, InvalidRequestError, LLMEngine, SamplingParams
from tests.models import tiny_llama

PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def make(model) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64,
                                                                        block_size=8)))


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
        for _ in range(100):
            if engine.engine.num_running == 0 and engine.engine.block_manager.num_free_blocks == 64:
                return True
            await asyncio.sleep(0.02)
        return False

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
    from llmaas.deployments.engine import EngineDeadError

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

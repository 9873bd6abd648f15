"""A fault of one request's data fails that request only; a fault of the shared step fails everyone at once.

Faults are injected through the engine's test-only ``fault_hook`` at each per-request stage while other
streams run; those streams must finish whole and token-identical to a run without the fault.
"""
from __future__ import annotations

import asyncio
import copy
import math

import pytest

from llmaas.engine import (
    AsyncLLMEngine,
    EngineConfig,
    EngineDeadError,
    LLMEngine,
    RequestFailedError,
    SamplingParams,
)
from tests.models import make_peft_adapter, tiny_llama

BLOCKS = 64
# Batch-mates that touch every per-request path: greedy, seeded sampling with penalties and logprobs, top-k
# past the vocabulary, an adapter.
GOOD = {
    "greedy": ([1, 2, 3], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), None),
    "seeded": ([5] * 11, SamplingParams(max_tokens=24, temperature=0.9, seed=(1 << 64) - 1, presence_penalty=0.5,
                                        repetition_penalty=1.3, logprobs=3, ignore_eos=True), None),
    "top-k": ([7, 8], SamplingParams(max_tokens=24, temperature=0.7, top_k=(1 << 63) - 1, seed=-(1 << 63),
                                     ignore_eos=True), None),
    "adapter": ([9, 10, 11, 12], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), "a"),
}
VICTIM = ([3, 1, 4, 1, 5], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), "b")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama(seed=0)
    d = tmp_path_factory.mktemp("adapters")
    return model, {"a": make_peft_adapter(model, d / "a", seed=1), "b": make_peft_adapter(model, d / "b", seed=2)}


def make(setup) -> AsyncLLMEngine:
    model, adapters = setup
    engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=BLOCKS, block_size=8,
                                                          max_loras=2, max_lora_rank=8))
    for name, path in adapters.items():
        engine.add_lora(name, path)
    return AsyncLLMEngine(engine)


async def collect(engine: AsyncLLMEngine, request_id: str, prompt, params, lora) -> list[int] | BaseException:
    tokens: list[int] = []
    try:
        async for out in engine.generate(request_id, prompt, params, lora):
            tokens.extend(out.new_token_ids)
    except Exception as exc:  # the victim's outcome
        return exc
    return tokens


async def run_all(engine: AsyncLLMEngine, with_victim: bool) -> dict[str, list[int] | BaseException]:
    requests = dict(GOOD, **({"victim": VICTIM} if with_victim else {}))
    results = await asyncio.gather(*(collect(engine, rid, *req) for rid, req in requests.items()))
    return dict(zip(requests, results))


def fault_at(stage: str, after_calls: int = 0):
    """A hook that raises for the victim at ``stage`` on its (after_calls + 1)-th visit there."""
    seen = {"n": 0}

    def hook(at: str, request_id: str) -> None:
        if at == stage and request_id == "victim":
            seen["n"] += 1
            if seen["n"] > after_calls:
                raise OverflowError(f"injected at {stage}")
    return hook


@pytest.mark.parametrize("stage, after_calls", [
    ("admission", 0),
    ("adapter load", 0),
    ("sampling", 0),      # its first token
    ("sampling", 5),      # mid-stream, after tokens were streamed
    ("postprocess", 3),
])
def test_a_fault_in_one_request_fails_only_that_request(setup, stage, after_calls):
    clean, engine = make(setup), make(setup)  # one asyncio loop per engine's life: one asyncio.run below
    engine.engine.fault_hook = fault_at(stage, after_calls)

    async def scenario():
        expected = await run_all(clean, with_victim=False)
        got = await run_all(engine, with_victim=True)
        idle = engine.engine.num_running + engine.engine.num_waiting, engine.engine.block_manager.num_free_blocks
        engine.engine.fault_hook = None
        return expected, got, idle, await run_all(engine, with_victim=False)

    expected, got, idle, after = asyncio.run(scenario())
    victim = got.pop("victim")
    assert isinstance(victim, RequestFailedError) and stage in str(victim) and "injected" in str(victim)
    assert got == expected  # every batch-mate whole and token-identical, seeded sampling included
    assert idle == (0, BLOCKS)  # nothing left running, every KV block back
    engine.check_health()  # the loop lives on
    assert after == expected  # and serves the next requests as before
    clean.shutdown()
    engine.shutdown()


def test_a_fault_after_the_draw_leaves_seeded_batch_mates_on_their_stream(setup, monkeypatch):
    """The victim's logprobs fail after the batched draw advanced every seeded generator: the row-by-row retry
    restores the random state first, so the seeded batch-mate still gets exactly its tokens."""
    from llmaas.engine import model_runner

    real = model_runner.pick_logprobs

    def pick(logprobs, tokens, params):
        if any(p.logprobs == 2 for p in params):  # the victim's marker
            raise FloatingPointError("injected after the draw")
        return real(logprobs, tokens, params)

    victim = ([3, 1, 4, 1, 5], SamplingParams(max_tokens=24, temperature=0.5, seed=7, logprobs=2, ignore_eos=True),
              None)
    clean, engine = make(setup), make(setup)

    async def scenario():
        expected = await run_all(clean, with_victim=False)
        monkeypatch.setattr(model_runner, "pick_logprobs", pick)
        requests = dict(GOOD, victim=victim)
        got = await asyncio.gather(*(collect(engine, rid, *req) for rid, req in requests.items()))
        return expected, dict(zip(requests, got))

    expected, got = asyncio.run(scenario())
    assert isinstance(got.pop("victim"), RequestFailedError)
    assert got == expected
    clean.shutdown()
    engine.shutdown()


def test_a_sampling_fault_every_row_meets_is_the_steps_own(setup):
    """Not a 400 for each request: a fault every row of a batch meets is the device's, raised out of the step (the
    async front then fails every caller with 503 and health fails, so Serve replaces the replica)."""
    engine = make(setup).engine  # stepped here, so the four requests surely share one batch
    for request_id, (prompt, params, lora) in GOOD.items():
        engine.add_request(request_id, prompt, params, lora)

    def device_fault(stage: str, request_id: str) -> None:
        if stage == "sampling":
            raise RuntimeError("CUDA error: device-side assert triggered")

    engine.fault_hook = device_fault
    with pytest.raises(RuntimeError, match="device-side assert"):
        engine.step()


def test_a_fault_of_the_shared_step_fails_everyone_at_once(setup):
    engine = make(setup)

    def broken_forward(*args, **kwargs):
        raise RuntimeError("device error")

    async def main():
        stream = engine.generate("r", [1, 2, 3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        await stream.__anext__()
        engine.engine.runner.model.forward = broken_forward  # the next step's forward pass fails
        with pytest.raises(EngineDeadError, match="device error"):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.call(lambda: None)  # a queued call (adapter load) is settled, not left hanging
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("s", [1], SamplingParams(max_tokens=2)):
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=30))
    with pytest.raises(EngineDeadError):
        engine.check_health()
    engine.shutdown()


@pytest.mark.parametrize("field, value", [
    ("top_k", 1 << 63), ("top_k", 0), ("seed", 1 << 64), ("seed", -(1 << 63) - 1), ("max_tokens", 1 << 31),
    ("max_tokens", 0), ("temperature", math.nan), ("top_p", math.nan), ("presence_penalty", math.inf),
    ("repetition_penalty", math.nan), ("stop_token_ids", (1 << 63,)), ("logprobs", 21),
])
def test_values_that_would_overflow_the_engine_are_refused_at_construction(field, value):
    with pytest.raises(ValueError):
        SamplingParams(**{field: value})


class _FailingGuide:
    """A grammar whose mask fails on the n-th step (llguidance's Rust panics arrive as exceptions like this)."""

    def __init__(self, fail_at: int) -> None:
        self.steps, self.fail_at = 0, fail_at

    def logit_mask(self, vocab_size: int):
        import torch

        self.steps += 1
        if self.steps > self.fail_at:
            raise RuntimeError("grammar matcher failed: injected")
        return torch.zeros(vocab_size)

    def accept(self, token: int) -> None:
        pass

    def is_finished(self) -> bool:
        return False


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failing_grammar_mask_fails_only_its_request(setup, overlap):
    """Masks are computed on a thread during the forward (or after it): either way a guide that fails ends its
    own request, and its batch-mates' tokens are those of a run without it."""
    model, _ = setup
    engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=BLOCKS, block_size=8,
                                                          max_loras=0, overlap_masks=overlap))
    mates = {rid: req for rid, req in GOOD.items() if req[2] is None}
    clean = dict(zip(mates, engine.generate([p for p, _, _ in mates.values()], [s for _, s, _ in mates.values()])))
    guided = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, guide=lambda: _FailingGuide(3))
    for rid, (prompt, params, _) in {**mates, "victim": ([3, 1, 4], guided, None)}.items():
        engine.add_request(rid, prompt, params)
    got: dict[str, list[int]] = {rid: [] for rid in [*mates, "victim"]}
    errors = {}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.new_token_ids
            if out.error is not None:
                errors[out.request_id] = out.error
    assert set(errors) == {"victim"} and "injected" in str(errors["victim"]) and len(got["victim"]) == 3
    assert {rid: got[rid] for rid in mates} == clean

"""What the Router's logic asks of the model stage: a stream's deltas every ``stream_interval_s``; a whole answer
in two messages (the first token, then the rest), unless stop strings must be watched as the text grows.

OpenAIServing over the real AsyncLLMEngine in process (a tiny random Llama with the default model's tokenizer):
the backend below is what the Ray one does minus the handles, and counts the messages each request got.
"""
from __future__ import annotations

import asyncio

import pytest
from transformers import AutoModelForCausalLM

from llmaas.app.catalog import ModelCatalog
from llmaas.app.messages import GenerateRequest, TokenDelta, TokenizedPrompt
from llmaas.app.protocol import CompletionRequest, Usage
from llmaas.app.serving import OpenAIServing, RequestLimits
from llmaas.app.usage import UsageLedger, inference_record
from llmaas.engine import AsyncLLMEngine, EngineConfig, LLMEngine

INTERVAL_S = 0.25


class EngineBackend:
    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine = engine
        self.requests: list[GenerateRequest] = []
        self.messages: dict[str, int] = {}

    async def encode_prompt(self, prompt: list[int], max_tokens: int | None) -> TokenizedPrompt:
        return TokenizedPrompt(list(prompt), max_tokens or 16)

    async def encode_chat(self, messages, max_tokens):  # chat is the Tokenizer stage's; not exercised here
        raise NotImplementedError

    async def generate(self, request: GenerateRequest):
        self.requests.append(request)
        async for out in self.engine.generate(request.request_id, request.prompt_token_ids, request.params,
                                              interval_s=request.stream_interval_s):
            self.messages[request.request_id] = self.messages.get(request.request_id, 0) + 1
            reason = out.finish_reason.value if out.finish_reason else None
            yield TokenDelta(out.new_token_ids, reason, out.num_prompt_tokens, out.num_output_tokens, out.logprobs,
                             num_cached_tokens=out.num_cached_tokens)


class LedgerMeter:
    """The Router's meter minus the Ray actor: records go straight into a real ledger."""

    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger
        self.usages: list[Usage] = []
        self.released: list[tuple] = []

    def record(self, tenant, model, usage: Usage, reserved_tokens: int = 0, latency_s: float | None = None):
        self.usages.append(usage)
        self.ledger.add([inference_record(tenant, model, usage.prompt_tokens, usage.completion_tokens,
                                          usage.prompt_tokens_details.cached_tokens, latency_s=latency_s)])
        return asyncio.sleep(0)

    def release(self, tenant, reserved_tokens):
        self.released.append((tenant, reserved_tokens))


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()  # one for the module: the engine delivers to the loop it started on
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def serving(tiny_chat_dir, default_tokenizer, tmp_path_factory):
    engine = AsyncLLMEngine(LLMEngine(AutoModelForCausalLM.from_pretrained(tiny_chat_dir),
                                      EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=8)))
    backend = EngineBackend(engine)
    meter = LedgerMeter(UsageLedger(tmp_path_factory.mktemp("usage")))
    yield OpenAIServing(backend, default_tokenizer, ModelCatalog("tiny", 256), RequestLimits(),
                        stream_interval_s=INTERVAL_S, meter=meter), backend
    engine.shutdown()


def request(**extra) -> CompletionRequest:
    return CompletionRequest(**{"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 24, "temperature": 0,
                                "ignore_eos": True, **extra})


def test_a_whole_answer_crosses_in_two_messages_and_a_stream_at_the_interval(serving, loop):
    api, backend = serving

    async def main():
        whole = await api.completion(request())
        chunks = [c async for c in api.completion_stream(request(stream=True))]
        return whole, chunks

    whole, chunks = loop.run_until_complete(main())
    (whole_req, stream_req) = backend.requests[-2:]
    # at most two (the first may hold all that queued before the loop woke); per step it would be 24
    assert whole_req.stream_interval_s is None and backend.messages[whole_req.request_id] <= 2
    assert stream_req.stream_interval_s == INTERVAL_S
    assert whole.usage.completion_tokens == 24
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text


def test_stop_strings_get_every_steps_tokens(serving, loop):
    """With a stop string the model stage sends each step's tokens, and the text ends before the stop."""
    api, backend = serving

    async def streamed(req: CompletionRequest) -> str:
        return "".join([c.choices[0].text async for c in api.completion_stream(req) if c.choices])

    full = loop.run_until_complete(api.completion(request())).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    whole = loop.run_until_complete(api.completion(request(stop=[stop]))).choices[0].text
    assert backend.requests[-1].stream_interval_s == 0.0
    chunks = loop.run_until_complete(streamed(request(stop=[stop], stream=True)))
    assert backend.requests[-1].stream_interval_s == 0.0
    for text in (whole, chunks):
        assert stop not in text and full.startswith(text), (text, stop)


def test_every_answer_is_metered_as_its_usage_says_and_a_left_stream_for_what_it_got(serving, loop):
    api, _ = serving
    meter = api.meter
    prompt = list(range(5, 25))  # 20 tokens: two full KV blocks of 8 to reuse

    async def main():
        first = await api.completion(request(prompt=prompt, max_tokens=4))
        again = await api.completion(request(prompt=prompt, max_tokens=4, n=2, seed=1, temperature=1.0))
        chunks = [c async for c in api.completion_stream(request(stream=True, stream_options={"include_usage": True}))]
        left = api.completion_stream(request(stream=True, max_tokens=200))
        # The client goes away after the first chunk (the first token, sent at once): the second comes an interval
        # later, and a fast machine generates all 200 tokens of the tiny model within that interval.
        seen = [await left.__anext__()]
        await left.aclose()
        return first, again, chunks[-1].usage, seen

    before = len(meter.usages)
    first, again, streamed, seen = loop.run_until_complete(main())
    metered = meter.usages[before:]
    assert metered[:3] == [first.usage, again.usage, streamed]
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens == 20 and again.usage.prompt_tokens_details.cached_tokens == 16  # 2 blocks
    assert again.usage.completion_tokens == 8  # n=2 choices: the prompt counts once, completions twice
    assert len(metered) == 4 and 1 <= metered[3].completion_tokens < 200 and metered[3].prompt_tokens == 4
    assert metered[3].completion_tokens >= len(seen)
    totals = meter.ledger.query()["total"]
    assert totals["requests"] == len(meter.usages)
    assert totals["completion_tokens"] == sum(u.completion_tokens for u in meter.usages)
    assert totals["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens for u in meter.usages)
    assert totals["latency_s"] > 0 and totals["avg_latency_ms"] > 0  # each metered with its end-to-end time


def test_a_request_that_fails_gives_its_token_reservation_back_unmetered(serving, loop):
    api, _ = serving
    meter = api.meter
    bad = request(prompt=[1, 2, 10**6])  # a token id past the vocabulary: the engine refuses it

    async def main():
        prep = await api.prepare_completion(bad)
        prep.reserved_tokens = 27  # what the Router's token bucket gave it
        with pytest.raises(Exception):
            await api.completion(bad, prepared=prep)
        stream = await api.prepare_completion(request(prompt=[1, 2, 10**6], stream=True))
        stream.reserved_tokens = 5
        with pytest.raises(Exception):
            [c async for c in api.completion_stream(request(stream=True), stream)]

    before = len(meter.usages)
    loop.run_until_complete(main())
    assert meter.released[-2:] == [(None, 27), (None, 5)] and len(meter.usages) == before

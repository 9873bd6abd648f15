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
from llmaas.app.protocol import CompletionRequest
from llmaas.app.serving import OpenAIServing, RequestLimits
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
            yield TokenDelta(out.new_token_ids, reason, out.num_prompt_tokens, out.num_output_tokens, out.logprobs)


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()  # one for the module: the engine delivers to the loop it started on
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def serving(tiny_chat_dir, default_tokenizer):
    engine = AsyncLLMEngine(LLMEngine(AutoModelForCausalLM.from_pretrained(tiny_chat_dir),
                                      EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=8)))
    backend = EngineBackend(engine)
    yield OpenAIServing(backend, default_tokenizer, ModelCatalog("tiny", 256), RequestLimits(),
                        stream_interval_s=INTERVAL_S), backend
    engine.shutdown()


def request(**extra) -> CompletionRequest:
    return CompletionRequest(model="tiny", prompt=[1, 2, 3, 4], max_tokens=24, temperature=0, ignore_eos=True,
                             **extra)


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

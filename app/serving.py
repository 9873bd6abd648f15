"""OpenAI completions over a tokenize + generate backend: the Router's logic, free of Ray.

The Router deployment plugs DeploymentHandles into ``Backend``; everything here
(request validation beyond pydantic, sampling params, postprocessing, response and
SSE chunk shapes, usage) is plain asyncio.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from llmaas.app.errors import InvalidRequest, NotFound
from llmaas.app.messages import GenerateRequest, TokenDelta, TokenizedPrompt
from llmaas.app.postprocess import Decoder, IncrementalDetokenizer, StopMatcher
from llmaas.app.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    new_id,
)
from llmaas.deployments.engine import SamplingParams

BASE_ALIAS = "base"


class Backend(Protocol):
    async def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None) -> TokenizedPrompt: ...
    async def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt: ...
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]: ...


@dataclass(slots=True)
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None  # set on the choice's last event
    prompt_tokens: int
    completion_tokens: int


@dataclass(slots=True)
class PreparedChoice:
    index: int
    prompt: TokenizedPrompt
    params: SamplingParams


class OpenAIServing:
    def __init__(self, backend: Backend, decoder: Decoder, served_name: str, max_model_len: int,
                 max_n: int, max_stop_sequences: int) -> None:
        self.backend = backend
        self.decoder = decoder
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.max_n = max_n
        self.max_stop_sequences = max_stop_sequences

    # ----- models -----
    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.served_name, max_model_len=self.max_model_len),
                               ModelCard(id=BASE_ALIAS, max_model_len=self.max_model_len)])

    def check_model(self, model: str) -> None:
        if model not in (self.served_name, BASE_ALIAS):
            raise NotFound(f"model {model!r} not found; available: {BASE_ALIAS}, {self.served_name}",
                           param="model", code="model_not_found")

    # ----- preparation: everything that can fail with a 4xx happens before any token -----
    def _check_common(self, req: ChatCompletionRequest | CompletionRequest) -> list[str]:
        self.check_model(req.model)
        if req.n > self.max_n:
            raise InvalidRequest(f"n must be <= {self.max_n}, got {req.n}", param="n")
        stops = req.stop_list()
        if len(stops) > self.max_stop_sequences:
            raise InvalidRequest(f"at most {self.max_stop_sequences} stop sequences are allowed", param="stop")
        return stops

    def _params(self, req: ChatCompletionRequest | CompletionRequest, prompt: TokenizedPrompt,
                index: int) -> SamplingParams:
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(max_tokens=prompt.max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, seed=seed, ignore_eos=req.ignore_eos)

    async def prepare_chat(self, req: ChatCompletionRequest) -> tuple[list[PreparedChoice], list[str]]:
        stops = self._check_common(req)
        prompt = await self.backend.encode_chat(req.messages, req.token_limit())
        return [PreparedChoice(i, prompt, self._params(req, prompt, i)) for i in range(req.n)], stops

    async def prepare_completion(self, req: CompletionRequest) -> tuple[list[PreparedChoice], list[str]]:
        stops = self._check_common(req)
        if req.echo:
            raise InvalidRequest("echo is not supported", param="echo")
        prompts = await asyncio.gather(*(self.backend.encode_prompt(p, req.token_limit()) for p in req.prompts()))
        choices = []
        for prompt in prompts:
            for _ in range(req.n):
                choices.append(PreparedChoice(len(choices), prompt, self._params(req, prompt, len(choices))))
        return choices, stops

    # ----- generation -----
    async def _run_choice(self, request_id: str, choice: PreparedChoice, stops: list[str]) -> AsyncIterator[ChoiceEvent]:
        detok = IncrementalDetokenizer(self.decoder, choice.prompt.token_ids)
        matcher = StopMatcher(stops)
        num_prompt = len(choice.prompt.token_ids)
        completion_tokens = 0
        stream = self.backend.generate(GenerateRequest(f"{request_id}-{choice.index}", choice.prompt.token_ids,
                                                       choice.params))
        try:
            async for delta in stream:
                completion_tokens = delta.num_output_tokens
                text = detok.add(delta.token_ids)
                if delta.finish_reason is not None:
                    text += detok.flush()
                text = matcher.feed(text)
                if matcher.stopped:
                    yield ChoiceEvent(choice.index, text, "stop", num_prompt, completion_tokens)
                    return
                if delta.finish_reason is not None:
                    yield ChoiceEvent(choice.index, text + matcher.flush(), delta.finish_reason, num_prompt,
                                      completion_tokens)
                    return
                if text:
                    yield ChoiceEvent(choice.index, text, None, num_prompt, completion_tokens)
        finally:
            await stream.aclose()  # stops generation early (stop string, client gone)

    async def _run_all(self, request_id: str, choices: list[PreparedChoice],
                       stops: list[str]) -> AsyncIterator[ChoiceEvent]:
        """Interleaves the choices' events as they come."""
        if len(choices) == 1:
            async for ev in self._run_choice(request_id, choices[0], stops):
                yield ev
            return
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

        async def pump(choice: PreparedChoice) -> None:
            try:
                async for ev in self._run_choice(request_id, choice, stops):
                    await queue.put(ev)
                await queue.put(None)
            except BaseException as exc:  # forwarded to the consumer, which re-raises
                await queue.put(exc)

        tasks = [asyncio.create_task(pump(c)) for c in choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _collect(self, request_id: str, choices: list[PreparedChoice],
                       stops: list[str]) -> tuple[list[str], list[str | None], Usage]:
        texts = [""] * len(choices)
        reasons: list[str | None] = [None] * len(choices)
        prompt_tokens: dict[int, int] = {}
        completion = [0] * len(choices)
        async for ev in self._run_all(request_id, choices, stops):
            texts[ev.index] += ev.text
            completion[ev.index] = ev.completion_tokens
            if ev.finish_reason is not None:
                reasons[ev.index] = ev.finish_reason
        for c in choices:  # n choices of one prompt count its tokens once, as OpenAI does
            prompt_tokens[id(c.prompt)] = len(c.prompt.token_ids)
        usage = Usage(prompt_tokens=sum(prompt_tokens.values()), completion_tokens=sum(completion),
                      total_tokens=sum(prompt_tokens.values()) + sum(completion))
        return texts, reasons, usage

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        choices, stops = await self.prepare_chat(req)
        rid = new_id("chatcmpl")
        texts, reasons, usage = await self._collect(rid, choices, stops)
        return ChatCompletionResponse(
            id=rid, model=req.model, usage=usage,
            choices=[ChatChoice(index=i, message=ResponseMessage(content=t), finish_reason=r)
                     for i, (t, r) in enumerate(zip(texts, reasons))])

    async def completion(self, req: CompletionRequest) -> CompletionResponse:
        choices, stops = await self.prepare_completion(req)
        rid = new_id("cmpl")
        texts, reasons, usage = await self._collect(rid, choices, stops)
        return CompletionResponse(
            id=rid, model=req.model, usage=usage,
            choices=[CompletionChoice(index=i, text=t, finish_reason=r)
                     for i, (t, r) in enumerate(zip(texts, reasons))])

    async def chat_stream(self, req: ChatCompletionRequest, prepared=None) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks as the OpenAI API streams them: role first, then content, then finish_reason, then usage."""
        choices, stops = prepared or await self.prepare_chat(req)
        rid, created = new_id("chatcmpl"), int(time.time())

        def chunk(choice_list: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=req.model, choices=choice_list, usage=usage)

        yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
                     for c in choices])
        completion: dict[int, int] = {}
        async for ev in self._run_all(rid, choices, stops):
            completion[ev.index] = ev.completion_tokens
            yield chunk([ChatChunkChoice(index=ev.index, delta=DeltaMessage(content=ev.text or None),
                                         finish_reason=ev.finish_reason)])
        if req.stream_options and req.stream_options.include_usage:
            prompt = len(choices[0].prompt.token_ids)
            done = sum(completion.values())
            yield chunk([], Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done))

    async def completion_stream(self, req: CompletionRequest, prepared=None) -> AsyncIterator[CompletionResponse]:
        choices, stops = prepared or await self.prepare_completion(req)
        rid, created = new_id("cmpl"), int(time.time())
        completion: dict[int, int] = {}
        async for ev in self._run_all(rid, choices, stops):
            completion[ev.index] = ev.completion_tokens
            yield CompletionResponse(id=rid, created=created, model=req.model, choices=[
                CompletionChoice(index=ev.index, text=ev.text, finish_reason=ev.finish_reason)])
        if req.stream_options and req.stream_options.include_usage:
            prompt = sum({id(c.prompt): len(c.prompt.token_ids) for c in choices}.values())
            done = sum(completion.values())
            yield CompletionResponse(id=rid, created=created, model=req.model, choices=[],
                                     usage=Usage(prompt_tokens=prompt, completion_tokens=done,
                                                 total_tokens=prompt + done))

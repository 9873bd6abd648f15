"""OpenAI completions over a tokenize + generate backend: the Router's logic, free of Ray.

The Router deployment plugs DeploymentHandles into ``Backend``; everything here
(request validation beyond pydantic, sampling params, postprocessing, response and
SSE chunk shapes, usage) is plain asyncio.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Awaitable, Protocol

from llmaas.app.catalog import ModelCatalog
from llmaas.app.errors import InvalidRequest
from llmaas.app.messages import GenerateRequest, TokenDelta, TokenizedPrompt
from llmaas.app.names import BASE_ALIAS
from llmaas.app.postprocess import Decoder, IncrementalDetokenizer, StopMatcher
from llmaas.app.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ResponseMessage,
    TokenLogprobEntry,
    Tool,
    TopLogprob,
    Usage,
    new_call_id,
    new_id,
)
from llmaas.app.response_cache import ResponseCache
from llmaas.app.structured import grammar_for
from llmaas.app.tools import ToolFamily, ToolPlan, call_stream, collect, plan_tools, read_calls
from llmaas.engine import SamplingParams, TokenLogprob


class Backend(Protocol):
    async def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None,
                          tools: list[Tool] | None = None, instruct_tools: bool = True) -> TokenizedPrompt: ...
    async def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt: ...
    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]: ...


@dataclass(slots=True)
class ChoiceEvent:
    index: int
    text: str
    finish_reason: str | None  # set on the choice's last event
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)  # tokens since the previous event, if asked
    echo: PromptEcho | None = None  # the choice's first event, when the request echoes its prompt
    cached_tokens: int = 0  # prompt tokens the prefix cache served


@dataclass(frozen=True, slots=True)
class PromptEcho:
    text: str  # the prompt as the client sent it (token ids: decoded)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None  # prompt tokens 1.. (None: not asked)


@dataclass(slots=True)
class ChoiceResult:
    """One choice of a non-streaming request, whole."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    echo: PromptEcho | None = None


@dataclass(slots=True)
class PreparedChoice:
    index: int
    prompt: TokenizedPrompt
    params: SamplingParams
    adapter: str | None  # immutable adapter version id, resolved at admission
    cache_salt: str | None = None  # prefix-cache partition (the tenant, when the cache is scoped per tenant)
    grammar: str | None = None  # llguidance grammar of response_format, compiled once in the Router
    echo: str | None = None  # completions with echo: the prompt text returned before the completion
    score_only: bool = False  # max_tokens 0 with echo: the prompt's logprobs are the answer, not a token


@dataclass(slots=True)
class Prepared:
    choices: list[PreparedChoice]
    stops: list[str]
    model: str  # what responses report: the adapter version that served, or the requested base name
    tools: ToolPlan | None = None  # chat with tools in play: how calls are read back from each choice
    tenant: str | None = None  # who is metered for it (None: no key, or a trusted handle caller)
    reserved_tokens: float = 0  # taken from the tenant's token rate budget at admission, settled when metered
    started: float = field(default_factory=time.monotonic)  # when preparing it began (tokenizing included): the
    # metered latency counts from here

    def most_tokens(self) -> int:
        """The most this request can use: its prompts (each once) plus every choice's max_tokens."""
        return sum(prompt_lengths(self.choices).values()) + sum(c.params.max_tokens for c in self.choices)


def prompt_lengths(choices: list[PreparedChoice]) -> dict[int, int]:
    """Each distinct prompt's length (n choices of one prompt share it: it counts once, as OpenAI counts it)."""
    return {id(c.prompt): len(c.prompt.token_ids) for c in choices}


class Observer(Protocol):
    """Receives per-choice timings (the Router feeds Prometheus metrics from it)."""

    def on_choice(self, model: str, ttft_s: float | None, e2e_s: float, completion_tokens: int) -> None: ...


class Meter(Protocol):
    """Records each answered request's usage (the Router's is the cluster's usage ledger). ``record`` submits at
    once (a cancelled caller's record is not lost) and returns what to await for it to be stored."""

    def record(self, tenant: str | None, model: str, usage: Usage, reserved_tokens: float = 0,
               latency_s: float | None = None) -> Awaitable[None]: ...

    def release(self, tenant: str | None, reserved_tokens: float) -> None:
        """A request that ends unmetered (it failed) gives its token reservation back."""


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """The operator's per-request limits, checked here so HTTP and the handle API enforce the same ones."""

    max_n: int = 8  # choices per request
    max_choices: int = 8  # prompts x n: the fan-out one request may cause
    max_stop_sequences: int = 4
    max_messages: int = 256


class _Tally:
    """A request's usage as its choices' events come: completion tokens and prefix-cache hits per choice."""

    def __init__(self, choices: list[PreparedChoice]) -> None:
        self.choices = choices
        self.completion: dict[int, int] = {}
        self.cached: dict[int, int] = {}

    def add(self, ev: ChoiceEvent) -> None:
        self.completion[ev.index] = ev.completion_tokens
        self.cached.setdefault(ev.index, ev.cached_tokens)

    def usage(self) -> Usage:
        """n choices of one prompt count its tokens once, as OpenAI does; its cached tokens are the fewest any of
        its choices was served (never more than it counts)."""
        prompt = prompt_lengths(self.choices)
        cached: dict[int, int] = {}
        for c in self.choices:
            hit = self.cached.get(c.index, 0)
            cached[id(c.prompt)] = min(cached.get(id(c.prompt), hit), hit)
        total, done = sum(prompt.values()), sum(self.completion.values())
        return Usage(prompt_tokens=total, completion_tokens=done, total_tokens=total + done,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(cached.values())))


class OpenAIServing:
    def __init__(self, backend: Backend, decoder: Decoder, catalog: ModelCatalog, limits: RequestLimits,
                 cache: ResponseCache | None = None, observer: Observer | None = None,
                 prefix_cache_per_tenant: bool = False, stream_interval_s: float = 0.0,
                 tool_family: ToolFamily = "smollm2", meter: Meter | None = None) -> None:
        self.backend = backend
        self.decoder = decoder
        self.catalog = catalog
        self.limits = limits
        self.cache = cache or ResponseCache(0)
        self.observer = observer
        self.prefix_cache_per_tenant = prefix_cache_per_tenant
        self.stream_interval_s = stream_interval_s
        self.tool_family = tool_family  # the served model's tool-call format (app/tools.py)
        self.special_ids = set(getattr(decoder, "all_special_ids", ()))
        self.meter = meter

    def models(self, tenant: str | None = None) -> ModelList:
        return ModelList(data=self.catalog.cards(tenant))

    def model(self, model: str, tenant: str | None = None) -> ModelCard:
        return self.catalog.card(model, tenant)

    # ----- preparation: everything that can fail with a 4xx happens before any token -----
    def _check_common(self, req: ChatCompletionRequest | CompletionRequest, tenant: str | None,
                      num_prompts: int = 1) -> tuple[list[str], str | None]:
        """Returns (stop strings, adapter version). The version is resolved once, here, for the whole request."""
        limits = self.limits
        if req.n > limits.max_n:
            raise InvalidRequest(f"n must be <= {limits.max_n}, got {req.n}", param="n")
        if num_prompts * req.n > limits.max_choices:
            raise InvalidRequest(f"{num_prompts} prompt(s) x n={req.n} asks for {num_prompts * req.n} choices; at "
                                 f"most {limits.max_choices} per request", param="n" if req.n > 1 else "prompt")
        if req.stream_options is not None and not req.stream:
            raise InvalidRequest("stream_options is only allowed when stream is true", param="stream_options")
        stops = req.stop_list()
        if len(stops) > limits.max_stop_sequences:
            raise InvalidRequest(f"at most {limits.max_stop_sequences} stop sequences are allowed", param="stop")
        return stops, self.catalog.resolve(req.model, tenant)

    def _params(self, req: ChatCompletionRequest | CompletionRequest, prompt: TokenizedPrompt,
                index: int) -> SamplingParams:
        seed = None if req.seed is None else req.seed + index
        return SamplingParams(max_tokens=prompt.max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=req.top_k, min_p=req.min_p, seed=seed, ignore_eos=req.ignore_eos,
                              logprobs=req.logprobs_k(),
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, logit_bias=req.logit_bias_pairs(),
                              prompt_logprobs=req.prompt_logprobs_k())

    async def prepare_chat(self, req: ChatCompletionRequest, tenant: str | None = None) -> Prepared:
        started = time.monotonic()
        if len(req.messages) > self.limits.max_messages:
            raise InvalidRequest(f"at most {self.limits.max_messages} messages are allowed", param="messages")
        stops, adapter = self._check_common(req, tenant)
        grammar, tools = None, None
        if req.response_format is not None or req.tools or req.tool_choice is not None:
            grammar, tools = await asyncio.to_thread(self._grammar, req)  # schema checks are CPU work
        prompt = await self.backend.encode_chat(req.messages, req.token_limit(), list(tools.tools) if tools else None,
                                                tools is None or tools.mode == "auto")
        salt = self._salt(tenant)
        return Prepared([PreparedChoice(i, prompt, self._params(req, prompt, i), adapter, salt, grammar)
                         for i in range(req.n)], stops, adapter or req.model, tools, tenant, started=started)

    @staticmethod
    def _grammar(req: ChatCompletionRequest) -> tuple[str | None, ToolPlan | None]:
        """(the grammar the output follows, the tool plan): 400s for a bad schema or a bad tool_choice."""
        tools = plan_tools(req)
        if tools is not None:
            return tools.grammar, tools
        return grammar_for(req.response_format), None

    async def prepare_completion(self, req: CompletionRequest, tenant: str | None = None) -> Prepared:
        started = time.monotonic()
        texts = req.prompts()
        stops, adapter = self._check_common(req, tenant, num_prompts=len(texts))
        score_only = req.max_tokens == 0
        if score_only and not req.echo:
            raise InvalidRequest("max_tokens 0 is only allowed with echo (to score the prompt)", param="max_tokens")
        limit = 1 if score_only else req.token_limit()  # scoring runs the prompt and one token it then drops
        prompts = await asyncio.gather(*(self.backend.encode_prompt(p, limit) for p in texts))
        choices = []
        for text, prompt in zip(texts, prompts):
            echo = None
            if req.echo:
                echo = text if isinstance(text, str) else self.decoder.decode(text, skip_special_tokens=False)
            for _ in range(req.n):
                choices.append(PreparedChoice(len(choices), prompt, self._params(req, prompt, len(choices)), adapter,
                                              self._salt(tenant), echo=echo, score_only=score_only))
        return Prepared(choices, stops, adapter or req.model, tenant=tenant, started=started)

    def _salt(self, tenant: str | None) -> str | None:
        return tenant if self.prefix_cache_per_tenant else None

    # ----- generation -----
    async def _run_choice(self, request_id: str, choice: PreparedChoice, stops: list[str],
                          interval_s: float | None) -> AsyncIterator[ChoiceEvent]:
        detok = IncrementalDetokenizer(self.decoder, choice.prompt.token_ids)
        matcher = StopMatcher(stops)
        num_prompt = len(choice.prompt.token_ids)
        completion_tokens = 0
        started, first_token = time.perf_counter(), None
        pending: list[TokenLogprob] = []
        echo: PromptEcho | None = None
        cached = 0

        def event(text: str, reason: str | None) -> ChoiceEvent:
            nonlocal echo
            ev = ChoiceEvent(choice.index, text, reason, num_prompt, completion_tokens, pending, echo, cached)
            echo = None  # with the first event only
            return ev

        stream = self.backend.generate(GenerateRequest(f"{request_id}-{choice.index}", choice.prompt.token_ids,
                                                       choice.params, choice.adapter, choice.cache_salt,
                                                       interval_s, choice.grammar))
        try:
            async for delta in stream:
                if first_token is None:
                    first_token = time.perf_counter()
                    cached = delta.num_cached_tokens
                    if choice.echo is not None:
                        echo = PromptEcho(choice.echo, choice.prompt.token_ids, delta.prompt_logprobs)
                if choice.score_only:  # the one token generated is not part of the answer
                    yield event("", "length")
                    return
                completion_tokens = delta.num_output_tokens
                pending.extend(delta.logprobs or ())
                text = detok.add(delta.token_ids)
                if delta.finish_reason is not None:
                    text += detok.flush()
                text = matcher.feed(text)
                if matcher.stopped:
                    yield event(text, "stop")
                    return
                if delta.finish_reason is not None:
                    yield event(text + matcher.flush(), delta.finish_reason)
                    return
                if text:
                    yield event(text, None)
                    pending = []
        finally:
            await stream.aclose()  # stops generation early (stop string, client gone)
            if self.observer is not None:
                self.observer.on_choice(choice.adapter or BASE_ALIAS, None if first_token is None else
                                        first_token - started, time.perf_counter() - started, completion_tokens)

    async def _run_all(self, request_id: str, choices: list[PreparedChoice], stops: list[str],
                       stream: bool = True) -> AsyncIterator[ChoiceEvent]:
        """Interleaves the choices' events as they come.

        A stream's deltas come from the model stage every ``stream_interval_s``; a whole answer's in one message
        after the first token. With stop strings every step's delta comes as it is made, so the text is watched
        as it grows and generation stops as soon as the Router sees the stop string.
        """
        interval = 0.0 if stops else self.stream_interval_s if stream else None
        if len(choices) == 1:
            async for ev in self._run_choice(request_id, choices[0], stops, interval):
                yield ev
            return
        queue: asyncio.Queue[ChoiceEvent | BaseException | None] = asyncio.Queue()

        async def pump(choice: PreparedChoice) -> None:
            try:
                async for ev in self._run_choice(request_id, choice, stops, interval):
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

    async def _metered(self, prep: Prepared, usage: Usage) -> None:
        """Records the answer's usage against the version that served it (the base under its served name, however
        it was asked for)."""
        if self.meter is not None:
            model = prep.choices[0].adapter or self.catalog.served_name if prep.choices else prep.model
            await self.meter.record(prep.tenant, model, usage, prep.reserved_tokens,
                                    latency_s=time.monotonic() - prep.started)

    def _unmetered(self, prep: Prepared) -> None:
        if self.meter is not None:
            self.meter.release(prep.tenant, prep.reserved_tokens)

    @contextlib.asynccontextmanager
    async def _metering(self, prep: Prepared) -> AsyncIterator[_Tally]:
        """A stream's usage is metered when it ends, however it ends: what was generated for a client that left
        counts, as the model did the work. A stream that failed before its first token costs nothing."""
        tally, failed = _Tally(prep.choices), False
        try:
            yield tally
        except Exception:
            failed = True
            raise
        finally:  # also on GeneratorExit / cancellation: the client left mid-stream
            if tally.completion or not failed:
                await self._metered(prep, tally.usage())
            else:
                self._unmetered(prep)


    async def _collect(self, request_id: str, prep: Prepared) -> tuple[list[ChoiceResult], Usage]:
        """Each choice whole, and usage."""
        results = [ChoiceResult() for _ in prep.choices]
        tally = _Tally(prep.choices)
        async for ev in self._run_all(request_id, prep.choices, prep.stops, stream=False):
            result = results[ev.index]
            result.text += ev.text
            result.logprobs += ev.logprobs
            result.echo = result.echo or ev.echo
            tally.add(ev)
            if ev.finish_reason is not None:
                result.finish_reason = ev.finish_reason
        return results, tally.usage()

    # ----- logprobs in OpenAI's two shapes -----
    def _token_str(self, token_id: int) -> str:
        return self.decoder.decode([token_id], skip_special_tokens=False)

    def _chat_logprobs(self, entries: list[TokenLogprob], asked: bool) -> ChoiceLogprobs | None:
        if not asked:
            return None

        def top(token_id: int, lp: float) -> TopLogprob:
            s = self._token_str(token_id)
            return TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8", "surrogatepass")))

        return ChoiceLogprobs(content=[TokenLogprobEntry(**top(e.token_id, e.logprob).model_dump(),
                                                         top_logprobs=[top(t, lp) for t, lp in e.top])
                                       for e in entries])

    def _completion_logprobs(self, entries: list[TokenLogprob], asked: bool, offset: int = 0,
                             echo: PromptEcho | None = None) -> CompletionLogprobs | None:
        """OpenAI's legacy shape; with ``echo`` the prompt's tokens come first (its first token has no logprob)."""
        if not asked:
            return None
        out = CompletionLogprobs()

        def add(token_id: int, entry: TokenLogprob | None, in_prompt: bool = False) -> None:
            """One token; ``entry`` None: the prompt's first token, which has no logprob."""
            nonlocal offset
            s = self._token_str(token_id)
            out.tokens.append(s)
            out.token_logprobs.append(None if entry is None else entry.logprob)
            out.top_logprobs.append(None if entry is None else {self._token_str(t): lp for t, lp in entry.top})
            out.text_offset.append(offset)
            if not (in_prompt and token_id in self.special_ids):  # a BOS the tokenizer added is not in the text
                offset += len(s)

        if echo is not None:
            if echo.logprobs is not None:
                add(echo.token_ids[0], None, in_prompt=True)
                for e in echo.logprobs:
                    add(e.token_id, e, in_prompt=True)
            offset = len(echo.text)  # the completion's text follows the prompt as the client sent it
        for e in entries:
            add(e.token_id, e)
        return out

    async def _respond(self, req: ChatCompletionRequest | CompletionRequest, prep: Prepared, tenant: str | None,
                       prefix: str, build):
        """Runs a non-streaming request (or answers it from the response cache) and builds its response."""
        key = self.cache.key(tenant, prep.model, req.model_dump())
        if (hit := self.cache.get(key)) is not None:
            response = self._fresh_copy(hit, prefix)  # billed as the answer says, like any other
        else:
            rid = new_id(prefix)
            try:
                rows, usage = await self._collect(rid, prep)
                # a worker thread: with logprobs a response holds up to max_choices x max_tokens x 21 entries,
                # whose detokenizing and model building would stall every other stream on this Router's loop
                response = await asyncio.to_thread(build, rid, rows, usage)
            except BaseException:
                self._unmetered(prep)
                raise
            self.cache.put(key, response)
        await asyncio.shield(self._metered(prep, response.usage))  # a deadline passing now does not unbill it
        return response

    @staticmethod
    def _fresh_copy(response, prefix: str):
        """A cached response as a new one: its own id, time and tool-call ids."""
        update: dict = {"id": new_id(prefix), "created": int(time.time())}
        if isinstance(response, ChatCompletionResponse) and any(c.message.tool_calls for c in response.choices):
            update["choices"] = [c.model_copy(update={"message": c.message.model_copy(update={"tool_calls": [
                t.model_copy(update={"id": new_call_id()}) for t in c.message.tool_calls]})})
                if c.message.tool_calls else c for c in response.choices]
        return response.model_copy(update=update)

    def _chat_choice(self, prep: Prepared, index: int, text: str, reason: str | None, logprobs: ChoiceLogprobs | None
                     ) -> ChatChoice:
        if prep.tools is None:
            return ChatChoice(index=index, message=ResponseMessage(content=text), finish_reason=reason,
                              logprobs=logprobs)
        content, deltas = read_calls(call_stream(prep.tools, self.tool_family), text, last=True)
        made = collect(deltas)
        return ChatChoice(index=index, finish_reason=self._finish(reason, bool(made)), logprobs=logprobs,
                          message=ResponseMessage(content=(content or None) if made else content,
                                                  tool_calls=made or None))

    @staticmethod
    def _finish(reason: str | None, called: bool) -> str | None:
        """OpenAI's finish_reason: 'tool_calls' when the answer (that ended by itself) made calls."""
        return "tool_calls" if called and reason == "stop" else reason

    async def chat(self, req: ChatCompletionRequest, tenant: str | None = None,
                   prepared: Prepared | None = None) -> ChatCompletionResponse:
        prep = prepared or await self.prepare_chat(req, tenant)
        asked = req.logprobs_k() is not None
        return await self._respond(req, prep, tenant, "chatcmpl", lambda rid, rows, usage: ChatCompletionResponse(
            id=rid, model=prep.model, usage=usage,
            choices=[self._chat_choice(prep, i, r.text, r.finish_reason, self._chat_logprobs(r.logprobs, asked))
                     for i, r in enumerate(rows)]))

    async def completion(self, req: CompletionRequest, tenant: str | None = None,
                         prepared: Prepared | None = None) -> CompletionResponse:
        prep = prepared or await self.prepare_completion(req, tenant)
        asked = req.logprobs_k() is not None
        return await self._respond(req, prep, tenant, "cmpl", lambda rid, rows, usage: CompletionResponse(
            id=rid, model=prep.model, usage=usage,
            choices=[CompletionChoice(index=i, text=(r.echo.text if r.echo else "") + r.text,
                                      finish_reason=r.finish_reason,
                                      logprobs=self._completion_logprobs(r.logprobs, asked, echo=r.echo))
                     for i, r in enumerate(rows)]))

    async def chat_stream(self, req: ChatCompletionRequest,
                          prepared: Prepared | None = None) -> AsyncIterator[ChatCompletionChunk]:
        """Chunks as the OpenAI API streams them: role first, then content, then finish_reason, then usage."""
        prep = prepared or await self.prepare_chat(req)
        rid, created = new_id("chatcmpl"), int(time.time())

        def chunk(choice_list: list[ChatChunkChoice], usage: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=rid, created=created, model=prep.model, choices=choice_list, usage=usage)

        yield chunk([ChatChunkChoice(index=c.index, delta=DeltaMessage(role="assistant", content=""))
                     for c in prep.choices])
        asked = req.logprobs_k() is not None
        calls = {c.index: call_stream(prep.tools, self.tool_family) for c in prep.choices} if prep.tools else {}
        called: set[int] = set()
        async with self._metering(prep) as tally:
            async for ev in self._run_all(rid, prep.choices, prep.stops):
                tally.add(ev)
                content, deltas = ev.text, []
                if ev.index in calls:
                    content, deltas = read_calls(calls[ev.index], ev.text, last=ev.finish_reason is not None)
                    called.update(ev.index for _ in deltas[:1])
                if not (content or deltas or ev.finish_reason or ev.logprobs):
                    continue  # text held back (it may be a tool call): nothing to send yet
                yield chunk([ChatChunkChoice(index=ev.index, delta=DeltaMessage(content=content or None,
                                                                                tool_calls=deltas or None),
                                             finish_reason=self._finish(ev.finish_reason, ev.index in called),
                                             logprobs=self._chat_logprobs(ev.logprobs, asked))])
            if req.stream_options and req.stream_options.include_usage:
                yield chunk([], tally.usage())

    async def completion_stream(self, req: CompletionRequest,
                                prepared: Prepared | None = None) -> AsyncIterator[CompletionResponse]:
        prep = prepared or await self.prepare_completion(req)
        rid, created = new_id("cmpl"), int(time.time())
        asked = req.logprobs_k() is not None
        offsets: dict[int, int] = {}
        async with self._metering(prep) as tally:
            async for ev in self._run_all(rid, prep.choices, prep.stops):
                tally.add(ev)
                text = (ev.echo.text if ev.echo else "") + ev.text  # echo: the prompt leads the first chunk
                yield CompletionResponse(id=rid, created=created, model=prep.model, choices=[
                    CompletionChoice(index=ev.index, text=text, finish_reason=ev.finish_reason,
                                     logprobs=self._completion_logprobs(ev.logprobs, asked, offsets.get(ev.index, 0),
                                                                        ev.echo))])
                offsets[ev.index] = offsets.get(ev.index, 0) + len(text)
            if req.stream_options and req.stream_options.include_usage:
                yield CompletionResponse(id=rid, created=created, model=prep.model, choices=[], usage=tally.usage())

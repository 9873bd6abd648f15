"""OpenAI API request/response models (the subset llmaas serves), in pydantic.

Requests forbid unknown fields, so a typo or an unsupported feature is a 400 that
names the field instead of being silently ignored.
"""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_serializer, model_validator

from llmaas.engine.sampling_params import (
    MAX_INT64,
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_TOKEN_ID,
    MAX_TOKENS,
    MIN_SEED,
)

# Bounds of the API's numbers: the engine's limits (one place, imported) plus the API's own, so every value is
# checked before any model time and nothing a client sends can overflow a tensor or a generator.
MAX_STOP_CHARS = 256  # per stop string
MAX_N = 128  # hard ceiling; the operator's max_n / max_choices are usually far lower
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = Field(False, description="Send a last chunk with token usage before [DONE].")


class _SamplingFields(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="'base', the served model name, or (later) an adapter name.")
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Most tokens to generate.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=MAX_INT64, description="Extension: sample among the k likeliest tokens.")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices to generate.")
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | \
        list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] | None = Field(
            None, description="Up to 4 strings that end the completion.")
    # an int64, as OpenAI's seed: seed + choice index then stays within the engine's (uint64) range
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_INT64, description="Makes sampling reproducible.")
    presence_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted once from every generated token.")
    frequency_penalty: float = Field(0.0, ge=-2, le=2, description="Subtracted per occurrence in the output.")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="Extension (HF/vLLM): >1 discourages any "
                                                                    "token seen in prompt or output.")
    min_p: float = Field(0.0, ge=0, le=1, description="Extension: drop tokens below min_p x the top probability.")
    ignore_eos: StrictBool = Field(False, description="Extension: keep generating past end-of-sequence.")
    logit_bias: dict[str, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] | None = Field(
        None, max_length=MAX_LOGIT_BIAS_TOKENS,
        description="Token id (as a string) -> bias added to its logit before sampling; -100 bans, 100 forces.")
    user: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, v):
        for key in v or {}:
            if not key.isdigit() or int(key) > MAX_TOKEN_ID:
                raise ValueError(f"logit_bias keys must be token ids (0..{MAX_TOKEN_ID}) as strings, got {key!r}")
        return v

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema", description="The JSON Schema the output follows.")
    strict: bool | None = None


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema,
                           Field(discriminator="type")]


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
MAX_TOOLS = 128


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments (an object).")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionName


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as a JSON text (it may not parse when cut by max_tokens).")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, description="An assistant turn's calls.")
    tool_call_id: str | None = Field(None, description="A tool turn: the call it answers.")
    # What an OpenAI response's message carries when a client sends it back as history (model_dump() of the
    # SDK's object): accepted and not rendered.
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = Field(None, description="Deprecated; use tool_calls.")

    @model_validator(mode="after")
    def _shape(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS, description="Newer name for max_tokens.")
    logprobs: StrictBool = Field(False, description="Return each output token's log-probability.")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="Also the likeliest alternatives (needs logprobs).")
    response_format: ResponseFormat | None = Field(
        None, description="text, json_object or json_schema: the output follows the grammar, token by token.")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS, description="Functions the model may call.")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="none, auto (the default with tools), required, or one named function; required and a "
                          "named function decode under the arguments' schema.")
    parallel_tool_calls: StrictBool | None = Field(None, description="Whether one answer may make several calls.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def tool_mode(self) -> str:
        """'none', 'auto', 'required' or 'named' (then tool_choice.function.name is the one to call)."""
        choice = self.tool_choice
        if not self.tools:
            return "none"
        if choice is None:
            return "auto"
        return choice if isinstance(choice, str) else "named"

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt_logprobs_k(self) -> int | None:
        return None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]] = Field(description="Text or token ids.")
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS, description="Most tokens to generate (OpenAI default "
                                                                       "16); 0 with echo scores the prompt only.")
    echo: StrictBool = Field(False, description="Return the prompt before the completion (with logprobs: the "
                                                "prompt tokens' too, the first one's null).")
    logprobs: int | None = Field(None, ge=0, le=5, description="Log-probabilities of the output and this many "
                                                              "alternatives per token.")

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_k(self) -> int | None:
        return self.logprobs if self.echo else None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens served from the prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # echo: the prompt's first token has none
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length", "tool_calls"]


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class _OmitNone(BaseModel):
    """Serialized without its unset (None) fields, as OpenAI streams tool-call deltas: the openai SDK's stream
    helper copies every key it is given, so a ``"type": null`` in a fragment would overwrite the call's type."""

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunction(_OmitNone):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_OmitNone):
    """A streamed call: its first delta has id, type and the function name; later ones argument fragments.
    One delta per call per chunk (older openai SDKs append a second one of the same index as a new call)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "llmaas"
    max_model_len: int | None = None
    parent: str | None = None  # adapters: the base model they run on
    alias_of: str | None = None  # an adapter name: the version it serves now
    canary: dict[str, float] | None = None  # an adapter name during a canary: version -> traffic share
    metadata: dict | None = None  # an adapter version: training job, metrics, base fingerprint


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def cursor_page(items: list[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """An OpenAI list page: the ``limit`` items after the one whose id is ``after`` (an unknown cursor: none)."""
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}

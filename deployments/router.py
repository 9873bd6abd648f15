"""Router: the FastAPI ingress and postprocessing stage.

HTTP routes and the Python handle API (``chat``, ``completions``, ``chat_stream``,
``completions_stream``) share one OpenAIServing core; errors leave as OpenAI-shaped
JSON with OpenAI's status codes (400 for validation, never FastAPI's 422).
"""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmaas.app.config import AppConfig
from llmaas.app.errors import APIError, InvalidRequest, unwrap
from llmaas.app.messages import GenerateRequest, TokenDelta, TokenizedPrompt
from llmaas.app.model_source import resolve_model
from llmaas.app.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, ModelList
from llmaas.app.serving import OpenAIServing

logger = logging.getLogger("ray.serve")

api = FastAPI(title="llmaas", description="OpenAI-compatible serving of a base model and its LoRA adapters.")


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


def _loc_param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or None


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                      "invalid_request_error", None, "invalid_json")
    param = _loc_param(tuple(first.get("loc", ())))
    msg = "; ".join(f"{_loc_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg')}" for e in exc.errors()[:5])
    return _error(400, msg, "invalid_request_error", param, first.get("type"))


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(status_code=exc.status_code, content=exc.to_dict())


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    return _error(exc.status_code, str(exc.detail), type_)


@api.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    inner = unwrap(exc)
    if isinstance(inner, APIError):
        return JSONResponse(status_code=inner.status_code, content=inner.to_dict())
    logger.exception("unhandled error", exc_info=exc)
    return _error(500, f"internal error: {type(inner).__name__}", "internal_error")


def _sse(chunks: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for c in chunks:
                yield f"data: {c.model_dump_json(exclude_none=False)}\n\n"
        except Exception as exc:  # headers are gone: report in-band, as OpenAI does
            inner = unwrap(exc)
            err = inner if isinstance(inner, APIError) else APIError(f"internal error: {type(inner).__name__}")
            if not isinstance(inner, APIError):
                logger.exception("stream failed", exc_info=exc)
            yield f"data: {json.dumps(err.to_dict())}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _HandleBackend:
    """Backend for OpenAIServing over DeploymentHandles; exceptions come back unwrapped."""

    def __init__(self, tokenizer: DeploymentHandle, llm: DeploymentHandle) -> None:
        self.tokenizer = tokenizer
        self.llm = llm

    async def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None) -> TokenizedPrompt:
        try:
            return await self.tokenizer.encode_chat.remote(messages, max_tokens)
        except Exception as exc:
            raise unwrap(exc) from None

    async def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        try:
            return await self.tokenizer.encode_prompt.remote(prompt, max_tokens)
        except Exception as exc:
            raise unwrap(exc) from None

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        gen = self.llm.options(stream=True).generate.remote(request)
        done = False
        try:
            async for delta in gen:
                done = delta.finish_reason is not None
                yield delta
            done = True
        except Exception as exc:
            done = True
            raise unwrap(exc) from None
        finally:
            if not done:
                gen.cancel()


def _parse(model: type[BaseModel], request: BaseModel | dict) -> Any:
    if isinstance(request, model):
        return request
    try:
        return model.model_validate(request)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"{_loc_param(tuple(first['loc']))}: {first['msg']}",
                             param=_loc_param(tuple(first["loc"]))) from None


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=512)
@serve.ingress(api)
class Router:
    def __init__(self, tokenizer: DeploymentHandle, llm: DeploymentHandle, config: AppConfig) -> None:
        from transformers import AutoTokenizer

        model = resolve_model(config.model)
        self.llm = llm
        self.serving = OpenAIServing(_HandleBackend(tokenizer, llm), AutoTokenizer.from_pretrained(model.path),
                                     model.served_name, model.max_model_len, config.max_n,
                                     config.max_stop_sequences)

    # ----- HTTP -----
    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        return self.serving.models()

    @api.post("/v1/chat/completions")
    async def http_chat(self, request: ChatCompletionRequest):
        if request.stream:
            prepared = await self.serving.prepare_chat(request)  # 4xx before the stream opens
            return _sse(self.serving.chat_stream(request, prepared))
        return await self.serving.chat(request)

    @api.post("/v1/completions")
    async def http_completions(self, request: CompletionRequest):
        if request.stream:
            prepared = await self.serving.prepare_completion(request)
            return _sse(self.serving.completion_stream(request, prepared))
        return await self.serving.completion(request)

    # ----- Python handle API: same types as HTTP -----
    async def chat(self, request: ChatCompletionRequest | dict):
        """``await handle.chat.remote({...})`` -> ChatCompletionResponse."""
        return await self.serving.chat(_parse(ChatCompletionRequest, request))

    async def completions(self, request: CompletionRequest | dict):
        """``await handle.completions.remote({...})`` -> CompletionResponse."""
        return await self.serving.completion(_parse(CompletionRequest, request))

    async def chat_stream(self, request: ChatCompletionRequest | dict):
        """``handle.options(stream=True).chat_stream.remote({...})`` yields ChatCompletionChunk."""
        async for chunk in self.serving.chat_stream(_parse(ChatCompletionRequest, request)):
            yield chunk

    async def completions_stream(self, request: CompletionRequest | dict):
        """``handle.options(stream=True).completions_stream.remote({...})`` yields CompletionResponse chunks."""
        async for chunk in self.serving.completion_stream(_parse(CompletionRequest, request)):
            yield chunk

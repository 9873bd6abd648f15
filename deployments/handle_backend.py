"""OpenAIServing's Backend over the Tokenizer and LLMServer DeploymentHandles.

Errors raised in the other stages come back as the original exception (an APIError keeps
its status code), not wrapped in Ray's task error.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from llmaas.app.errors import unwrap
from llmaas.app.messages import GenerateRequest, TokenDelta, TokenizedPrompt
from llmaas.app.protocol import ChatMessage


class HandleBackend:
    def __init__(self, tokenizer: DeploymentHandle, llm: DeploymentHandle) -> None:
        self.tokenizer = tokenizer
        self.llm = llm

    async def _tokenize(self, method: str, *args: Any) -> TokenizedPrompt:
        try:
            return await getattr(self.tokenizer, method).remote(*args)
        except Exception as exc:
            raise unwrap(exc) from None

    async def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None) -> TokenizedPrompt:
        return await self._tokenize("encode_chat", messages, max_tokens)

    async def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        return await self._tokenize("encode_prompt", prompt, max_tokens)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Streams the model stage's deltas; leaving early (stop string, client gone, deadline) cancels the call,
        which aborts the engine request."""
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

"""OpenAIServing's Backend over the Tokenizer and LLMServer DeploymentHandles (or a PromptEncoder in process).

Errors raised in the other stages come back as the original exception (an APIError keeps
its status code), not wrapped in Ray's task error.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray.serve.handle import DeploymentHandle

from llmaas.app.errors import unwrap
from llmaas.app.messages import GenerateRequest, TokenDelta, TokenizedPrompt
from llmaas.app.prompts import PromptEncoder
from llmaas.app.protocol import ChatMessage, Tool


class HandleBackend:
    def __init__(self, tokenizer: DeploymentHandle, llm: DeploymentHandle, encoder: PromptEncoder | None = None
                 ) -> None:
        self.tokenizer = tokenizer
        self.llm = llm
        self.encoder = encoder  # set: encode here, on one worker thread of this replica (see app/prompts.py)
        self._encode_thread = ThreadPoolExecutor(1, thread_name_prefix="llmaas-encode") if encoder else None

    async def _tokenize(self, method: str, *args: Any) -> TokenizedPrompt:
        if self.encoder is not None:
            return await asyncio.get_running_loop().run_in_executor(self._encode_thread,
                                                                    getattr(self.encoder, method), *args)
        try:
            return await getattr(self.tokenizer, method).remote(*args)
        except Exception as exc:
            raise unwrap(exc) from None

    async def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None,
                          tools: list[Tool] | None = None, instruct_tools: bool = True) -> TokenizedPrompt:
        return await self._tokenize("encode_chat", messages, max_tokens, tools, instruct_tools)

    async def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        return await self._tokenize("encode_prompt", prompt, max_tokens)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[TokenDelta]:
        """Streams the model stage's deltas; leaving early (stop string, client gone, deadline) cancels the call,
        which aborts the engine request."""
        # by value over the replica's gRPC channel: each delta is one message, not a Ray object (see PROXY_ENV_VARS)
        gen = self.llm.options(stream=True, _by_reference=False).generate.remote(request)
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

"""Tokenizer deployment (CPU): chat template, encode, context check, where tokenization scales apart from the
Router (``tokenize_in_router: false``); by default the Router runs the same PromptEncoder in process."""
from __future__ import annotations

from ray import serve
from transformers import AutoTokenizer

from llmaas.app.messages import TokenizedPrompt
from llmaas.app.model_source import resolve_model
from llmaas.app.prompts import PromptEncoder
from llmaas.app.protocol import ChatMessage, Tool
from llmaas.deployments.config import AppConfig


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, graceful_shutdown_wait_loop_s=0.5)  # see Router's
class Tokenizer:
    def __init__(self, config: AppConfig) -> None:
        model = resolve_model(config.model)
        self.encoder = PromptEncoder(AutoTokenizer.from_pretrained(model.path), model.served_name,
                                     model.max_model_len, config.tool_format)

    def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None,
                    tools: list[Tool] | None = None, instruct_tools: bool = True) -> TokenizedPrompt:
        return self.encoder.encode_chat(messages, max_tokens, tools, instruct_tools)

    def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        return self.encoder.encode_prompt(prompt, max_tokens)

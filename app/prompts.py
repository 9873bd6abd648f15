"""Prompts to token ids: chat template, encode, context-length check (the Tokenizer stage's work, Ray-free).

The Router runs it in process by default (``tokenize_in_router``), one worker thread with its own tokenizer
copy: a Rust tokenizer that one thread encodes with while another decodes can fail with "Already borrowed",
and a long prompt must not stall the event loop that streams every other request. The Tokenizer deployment
runs the same class where tokenization should scale apart from the Router.
"""
from __future__ import annotations

from jinja2 import TemplateError

from llmaas.app.errors import InvalidRequest
from llmaas.app.messages import TokenizedPrompt
from llmaas.app.protocol import ChatMessage, Tool
from llmaas.app.tools import render, tool_family


def check_context(num_prompt: int, max_tokens: int | None, max_model_len: int, param: str) -> int:
    """Returns the generation budget, or raises the OpenAI context_length_exceeded error."""
    if num_prompt == 0:
        raise InvalidRequest("the prompt is empty", param=param)
    wanted = num_prompt + (max_tokens or 1)
    if num_prompt >= max_model_len or wanted > max_model_len:
        raise InvalidRequest(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{wanted} tokens ({num_prompt} in the {param}, {max_tokens or 1} for the completion). "
            "Please reduce the length of the prompt or max_tokens.",
            param=param, code="context_length_exceeded")
    return max_tokens or (max_model_len - num_prompt)


class PromptEncoder:
    def __init__(self, tokenizer, served_name: str, max_model_len: int, tool_format: str = "auto") -> None:
        self.tokenizer = tokenizer
        self.served_name = served_name
        self.max_model_len = max_model_len
        self.vocab = len(tokenizer)
        self.tool_family = tool_family(tokenizer.chat_template, tool_format)

    def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None,
                    tools: list[Tool] | None = None, instruct_tools: bool = True) -> TokenizedPrompt:
        """``tools``: the functions the model is shown (None when tool_choice is none); ``instruct_tools``: with
        how to call them (tool_choice auto; a grammar needs no instructions)."""
        if self.tokenizer.chat_template is None:
            raise InvalidRequest(f"model {self.served_name!r} has no chat template; use /v1/completions",
                                 param="messages")
        convo, template_tools = render(messages, tools, self.tool_family, instruct_tools)
        try:  # transformers renders templates in a sandboxed Jinja environment
            ids = self.tokenizer.apply_chat_template(convo, tools=template_tools, add_generation_prompt=True,
                                                     tokenize=True, return_dict=False)
        except TemplateError as exc:  # the template's own rules (e.g. Llama 3.1: one tool call per turn)
            raise InvalidRequest(f"the model's chat template refuses this conversation: {exc}",
                                 param="messages") from None
        return TokenizedPrompt(list(ids), check_context(len(ids), max_tokens, self.max_model_len, "messages"))

    def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            if any(t < 0 or t >= self.vocab for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {self.vocab})", param="prompt")
            ids = list(prompt)
        return TokenizedPrompt(ids, check_context(len(ids), max_tokens, self.max_model_len, "prompt"))

"""Tokenizer deployment (CPU): chat template, encode, context-length check."""
from __future__ import annotations

from ray import serve
from transformers import AutoTokenizer

from llmaas.app.errors import InvalidRequest
from llmaas.app.messages import TokenizedPrompt
from llmaas.app.model_source import resolve_model
from llmaas.app.protocol import ChatMessage
from llmaas.deployments.config import AppConfig


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


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Tokenizer:
    def __init__(self, config: AppConfig) -> None:
        self.model = resolve_model(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model.path)

    def encode_chat(self, messages: list[ChatMessage], max_tokens: int | None) -> TokenizedPrompt:
        if self.tokenizer.chat_template is None:
            raise InvalidRequest(f"model {self.model.served_name!r} has no chat template; use /v1/completions",
                                 param="messages")
        # transformers renders templates in a sandboxed Jinja environment.
        convo = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        ids = self.tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return TokenizedPrompt(list(ids), check_context(len(ids), max_tokens, self.model.max_model_len, "messages"))

    def encode_prompt(self, prompt: str | list[int], max_tokens: int | None) -> TokenizedPrompt:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            vocab = len(self.tokenizer)
            if any(t < 0 or t >= vocab for t in prompt):
                raise InvalidRequest(f"token ids must be in [0, {vocab})", param="prompt")
            ids = list(prompt)
        return TokenizedPrompt(ids, check_context(len(ids), max_tokens, self.model.max_model_len, "prompt"))

"""Structured output: OpenAI's ``response_format`` as a grammar the engine decodes under (llguidance).

The Router turns ``json_object`` / ``json_schema`` into an llguidance grammar and checks it (an invalid schema
is a 400 before any model time); the model stage compiles it into a matcher once per grammar (off the event
loop) and gives each request a copy; the engine masks every token the grammar rules out before sampling
(engine.TokenGuide), so the output is the sampled tokens, always valid, never repaired afterwards.
llguidance (Microsoft's; vLLM and SGLang use it): a 3 MB wheel without dependencies, ~0.1 ms per mask for
SmolLM2's 49k vocabulary on a 2-core box; xgrammar would pull triton onto a CPU box.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch

from llmaas.app.errors import InvalidRequest

ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
MAX_SCHEMA_CHARS = 65536  # a schema is checked in the Router's request path: bound the work one request asks
# Compact JSON: with free whitespace a small model can pad forever instead of closing the object. An override,
# so a schema's own "x-guidance" options cannot turn it back on.
OVERRIDES = {"whitespace_flexible": False}


@functools.lru_cache(maxsize=256)
def _compile(schema: str) -> tuple[str, str]:
    """(grammar, error): errors are cached too, so a bad schema sent again costs nothing."""
    if len(schema) > MAX_SCHEMA_CHARS:
        return "", f"the JSON schema is over {MAX_SCHEMA_CHARS} characters"
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=OVERRIDES)
        return grammar, llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError, RuntimeError) as exc:
        return "", str(exc) or type(exc).__name__


def grammar_for(response_format: Any) -> str | None:
    """An llguidance grammar for a request's ``response_format`` (None: unconstrained text); 400 if unsupported.
    Properties keep the schema's order (models answer in it: reasoning before answer)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return grammar_for_schema(ANY_JSON_OBJECT, "response_format")
    spec = response_format.json_schema.schema_
    return grammar_for_schema(spec if spec is not None else {}, "response_format")


def grammar_for_schema(schema: dict[str, Any], param: str) -> str:
    """The grammar of output valid against a JSON schema (cached per schema), or a 400 on ``param``."""
    grammar, error = _compile(json.dumps(schema, separators=(",", ":")))
    if error:
        raise InvalidRequest(f"{param}: the JSON schema is not supported: {error}", param=param)
    return grammar


def _engine_error(exc: BaseException) -> RuntimeError:
    """llguidance's Rust panics arrive as BaseException (pyo3's PanicException): as an Exception they fail one
    request; as they are they would end the engine loop."""
    return RuntimeError(f"grammar matcher failed: {type(exc).__name__}: {exc}")


# byte -> its 8 tokens' logit mask: bit k of byte j of llguidance's little-endian bitmask is token 8j + k
_BYTE_MASKS = torch.tensor([[0.0 if (byte >> k) & 1 else float("-inf") for k in range(8)] for byte in range(256)])


class GrammarGuide:
    """engine.TokenGuide over one llguidance matcher (one per request)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def logit_mask(self, vocab_size: int) -> torch.Tensor:
        """Shape: [vocab_size] float32, 0 / -inf; tokens past the tokenizer's vocabulary (padding rows) are never
        allowed. One table lookup per byte of the bitmask (~30 us for 49k tokens; unpacking bits was ~45)."""
        try:
            raw = self.matcher.compute_bitmask()
        except BaseException as exc:  # noqa: BLE001 - see _engine_error
            raise _engine_error(exc) from None
        packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8)  # [ceil(V' / 32) * 4]
        mask = _BYTE_MASKS.index_select(0, packed.int()).view(-1)  # [8 * bytes]
        if mask.numel() >= vocab_size:
            return mask[:vocab_size]
        return torch.cat([mask, mask.new_full((vocab_size - mask.numel(),), float("-inf"))])

    def accept(self, token: int) -> None:
        try:
            ok = self.matcher.consume_token(token)
        except BaseException as exc:  # noqa: BLE001 - see _engine_error
            raise _engine_error(exc) from None
        if not ok:
            raise ValueError(f"token {token} does not fit the grammar: {self.matcher.get_error()}")

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()


@functools.lru_cache(maxsize=4)
def guide_tokenizer(path: str, eos_token_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of a checkpoint's tokenizer (~0.3 s for SmolLM2's; once per process), ending on every
    id the engine ends on (the model's turn end may not be the tokenizer's eos)."""
    from transformers import AutoTokenizer

    try:
        return llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(path), eos_token=list(eos_token_ids))
    except ValueError as exc:  # e.g. a model with only a slow tokenizer
        raise InvalidRequest(f"grammar-constrained output (response_format, tool_choice) is not available for "
                             f"this model: {exc}") from None


@functools.lru_cache(maxsize=256)
def _template(tokenizer: llguidance.LLTokenizer, grammar: str) -> llguidance.LLMatcher:
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    if matcher.is_error():  # response_format's or a tool's schema: the Router checked it, the tokenizer did not
        raise InvalidRequest(f"the output's grammar cannot be built for this model: {matcher.get_error()}")
    return matcher


def guide_factory(path: str, eos_token_ids: Sequence[int], grammar: str) -> Callable[[], GrammarGuide]:
    """What SamplingParams.guide holds: a fresh copy of the grammar's matcher per request. The matcher is built
    once per (tokenizer, grammar), here: call this off the event loop (a big grammar takes ~0.1-1 s)."""
    template = _template(guide_tokenizer(path, tuple(eos_token_ids)), grammar)
    return lambda: GrammarGuide(template.deep_copy())

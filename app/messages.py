"""Typed messages between the Serve stages (pickled across DeploymentHandles)."""
from __future__ import annotations

from dataclasses import dataclass

from llmaas.engine import SamplingParams, TokenLogprob


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    token_ids: list[int]
    max_tokens: int  # what generation may use: the request's limit, or the rest of the context


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # immutable version id ('sentiment@3'); None runs the base model
    cache_salt: str | None = None  # prefix-cache partition (the tenant, when the cache is scoped per tenant)
    # How long the model stage may gather deltas into one message (the first and last go at once): 0 sends each
    # as it comes, None only the first and the whole rest (a non-streaming request needs no more).
    stream_interval_s: float | None = 0.0
    grammar: str | None = None  # llguidance grammar the output follows (structured output); None: free text


@dataclass(frozen=True, slots=True)
class TokenDelta:
    """New token ids for one request; the last one carries finish_reason ('stop' | 'length')."""

    token_ids: list[int]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked for logprobs
    prompt_logprobs: list[TokenLogprob] | None = None  # first delta, echo with logprobs: prompt tokens 1..
    num_cached_tokens: int = 0  # prompt tokens the model stage's prefix cache served

"""Per-request sampling parameters (validated at construction)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

# The engine's hard limits on a request's numbers, in one place: the API edge imports them, so a value
# that would overflow a tensor or a generator is a 400 before any model time (and a ValueError here for
# any other caller), never an error inside a step.
MAX_INT64 = (1 << 63) - 1
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
MAX_TOKENS = (1 << 31) - 1  # the context limit is checked too; this bounds the arithmetic
MAX_LOGPROBS = 20
MAX_TOKEN_ID = (1 << 31) - 1  # token ids past this are no vocabulary's (the engine checks its own)
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on each logit_bias value
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI's bound on logit_bias entries


class TokenGuide(Protocol):
    """One request's constraint on its next token (grammar-constrained decoding): the engine adds ``logit_mask``
    to the row's logits before sampling, then tells the guide which token was chosen."""

    def logit_mask(self, vocab_size: int) -> torch.Tensor:
        """Shape: [vocab_size] float32: 0 for tokens that may come next, -inf for the rest. Additive, because
        adding a float row costs ~10x less than masked_fill with a scattered bool mask on CPU (measured)."""

    def accept(self, token: int) -> None:
        """Advances past ``token`` (always one the mask allowed)."""

    def is_finished(self) -> bool:
        """Whether the constrained output is complete (nothing more may follow): the request ends there."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request samples its tokens. ``temperature == 0`` means greedy."""

    max_tokens: int = 16  # generated tokens at most
    temperature: float = 1.0
    top_p: float = 1.0  # nucleus mass kept; 1.0 keeps all
    top_k: int | None = None  # None keeps all tokens
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability (Nguyen et al., 2024); 0 is off
    presence_penalty: float = 0.0  # OpenAI: subtract once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive (multiply negative) logits of seen tokens; 1 is off
    seed: int | None = None  # fixes this request's random stream, independent of batch mates
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks generate exactly max_tokens
    logprobs: int | None = None  # report the chosen token's log-probability and this many top alternatives
    prompt_logprobs: int | None = None  # also each prompt token's (after the first) and its top alternatives;
    # every prompt position then runs through the model (no prefix-cache reuse)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit) before sampling
    guide: Callable[[], TokenGuide] | None = field(default=None, compare=False)  # a new guide per request

    def __post_init__(self) -> None:
        floats = (self.temperature, self.top_p, self.min_p, self.presence_penalty, self.frequency_penalty,
                  self.repetition_penalty)
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in floats):
            raise ValueError("sampling parameters must be finite numbers")
        if not 1 <= self.max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be in [1, {MAX_TOKENS}], got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and not 1 <= self.top_k <= MAX_INT64:
            raise ValueError(f"top_k must be in [1, {MAX_INT64}] or None, got {self.top_k}")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [{MIN_SEED}, {MAX_SEED}], got {self.seed}")
        if any(not 0 <= t <= MAX_INT64 for t in self.stop_token_ids):
            raise ValueError(f"stop token ids must be in [0, {MAX_INT64}]")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        for k in (self.logprobs, self.prompt_logprobs):
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"logprobs and prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias may name at most {MAX_LOGIT_BIAS_TOKENS} tokens")
        for token, bias in self.logit_bias:
            if not 0 <= token <= MAX_TOKEN_ID or not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise ValueError(f"logit_bias: token ids must be in [0, {MAX_TOKEN_ID}] and biases in "
                                 f"[-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {token}: {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether sampling edits this row's logits (penalties, logit_bias) before choosing."""
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
                or bool(self.logit_bias))

"""Per-request sampling parameters (validated at construction)."""
from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0 or not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

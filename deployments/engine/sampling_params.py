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
    seed: int | None = None  # fixes this request's random stream, independent of batch mates
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False  # benchmarks generate exactly max_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

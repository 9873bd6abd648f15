"""One request's state inside the engine."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampler import TokenLogprob
from .sampling_params import SamplingParams, TokenGuide


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller


@dataclass(slots=True)
class Sequence:
    """Token ids plus book-keeping; the scheduler and block manager mutate it, nothing else."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # monotonically increasing admission counter (FCFS order, youngest = largest)
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # physical KV block ids, in position order
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache hash of each full computed block
    num_preemptions: int = 0
    lora: str | None = None  # adapter name; None runs the base model
    lora_slot: int | None = None  # pool slot while running with an adapter
    cache_salt: str | None = None  # prefix-cache partition (e.g. the tenant): blocks are reused only within it
    slot_waits: int = 0  # steps this request waited for a LoRA slot (every slot pinned)
    guide: TokenGuide | None = None  # its grammar's state, when the request is constrained
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # prompt tokens 1.., when asked
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache served at first admission

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens that still have to go through the model before the next sample."""
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

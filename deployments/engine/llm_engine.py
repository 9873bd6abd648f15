"""The engine: admit requests, step the batch, report new tokens.

``step()`` is schedule -> run -> postprocess; requests join and leave the running
batch between steps (iteration-level scheduling, Orca, Yu et al., 2022).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .block_manager import BlockManager
from .config import EngineConfig
from .model import CausalLM
from .model_runner import ModelRunner, num_kv_blocks_for
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import FinishReason, Sequence


@dataclass(slots=True)
class StepOutput:
    """What one request gained in one step (or, merged, over several)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class InvalidRequestError(ValueError):
    pass


class LLMEngine:
    def __init__(self, hf_model: nn.Module, config: EngineConfig) -> None:
        hf_model = hf_model.to(device=config.device, dtype=config.dtype)
        model_limit = getattr(hf_model.config, "max_position_embeddings", config.max_model_len)
        self.model = CausalLM(hf_model, min(config.max_model_len, model_limit))
        num_blocks = num_kv_blocks_for(config, self.model)
        self.max_model_len = min(config.max_model_len, model_limit, num_blocks * config.block_size)
        self.config = config
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.block_manager)
        self.runner = ModelRunner(config, self.model, num_blocks)
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def validate(self, request_id: str, prompt_token_ids: list[int]) -> None:
        """Raises InvalidRequestError for input the engine cannot run."""
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty: at least one token is needed")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len}")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate(request_id, prompt_token_ids)
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals))
        self._seqs[request_id] = seq
        self.runner.add_generator(seq)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        seq.finish_reason = FinishReason.ABORT
        self._forget(seq)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sampled = self.runner.run(batch)
        return [self._postprocess(batch.seqs[row], token) for row, token in sampled.items()]

    def _postprocess(self, seq: Sequence, token: int) -> StepOutput:
        seq.output_token_ids.append(token)
        p = seq.params
        if (not p.ignore_eos and token in self.config.eos_token_ids) or token in p.stop_token_ids:
            seq.finish_reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            self._forget(seq)
        return StepOutput(seq.request_id, [token], seq.finish_reason, seq.num_prompt_tokens,
                          len(seq.output_token_ids))

    def _forget(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self.runner.drop_generator(seq.request_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline convenience: runs the prompts to completion, returns generated ids in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params_list):
            self.add_request(rid, prompt, p)
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[rid] for rid in ids]

"""The engine: admit requests, step the batch, report new tokens.

``step()`` is schedule -> run -> postprocess; requests join and leave the running
batch between steps (iteration-level scheduling, Orca, Yu et al., 2022).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from .block_manager import BlockManager
from .config import EngineConfig
from .gguf import load_int4_projections
from .kernel_plan import Calibration, calibrate
from .lora import AdapterError, AdapterWeights, check_fits, load_peft_adapter
from .model import build_model
from .model_runner import ModelRunner, num_kv_blocks_for
from .quantization import quantize_model
from .sampler import TokenLogprob
from .sampling_params import SamplingParams
from .scheduler import ScheduledBatch, Scheduler
from .sequence import FinishReason, Sequence


@dataclass(slots=True)
class StepOutput:
    """What one request gained in one step (or, merged, over several)."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token: prompt tokens 1.., when asked
    error: RequestFailedError | None = None  # the request failed (finish_reason ABORT): raise this to its caller
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (OpenAI's cached_tokens)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class InvalidRequestError(ValueError):
    param: str | None = "prompt"  # the request field at fault, for the API's error


class RequestFailedError(InvalidRequestError):
    """One request's own data failed a per-request stage (admission, adapter load, sampling, postprocessing):
    that request ends with this error; the step and every other request go on."""

    param = None


FaultHook = Callable[[str, str], None]  # (stage, request_id); may raise. Tests inject per-request faults here.


class LLMEngine:
    def __init__(self, hf_model: nn.Module, config: EngineConfig) -> None:
        # Quantized on the device from the weights as loaded (float32), before the cast to the compute dtype rounds
        # them; fused modules' parts are views, which a later move would copy apart.
        hf_model = hf_model.to(device=config.device)
        self.quantized_bytes = quantize(hf_model, config)  # weight bytes the quantized projections hold
        hf_model = hf_model.to(dtype=config.dtype)
        model_limit = getattr(hf_model.config, "max_position_embeddings", config.max_model_len)
        self.model = build_model(hf_model, min(config.max_model_len, model_limit), config.attention_backend,
                                 config.block_size)
        num_blocks = num_kv_blocks_for(config, self.model)
        self.max_model_len = min(config.max_model_len, model_limit, num_blocks * config.block_size)
        self.config = config
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.runner = ModelRunner(config, self.model, num_blocks)
        self.calibration: Calibration | None = None  # the measured kernel per projection shape and M bucket
        if config.quantization != "none":  # after the runner set the allocator up: kernels are timed as they run
            self.calibration = calibrate(hf_model, config.dtype, config.kernel_cache_file)
        self.runner.capture_graphs()  # after calibration: the graphs record the chosen kernels
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()
        self._adapters: dict[str, AdapterWeights] = {}  # registered adapters (host copies), by name
        self.fault_hook: FaultHook | None = None  # test-only seam: called at each per-request stage
        self.num_admitted = 0  # requests accepted by add_request since start
        self.num_aborted = 0  # of those, ended by abort_request (client gone, timeout, drain)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    # ----- adapters -----
    def add_lora(self, name: str, path: str | Mapping[str, bytes]) -> None:
        """Registers a PEFT LoRA directory, or its files' bytes, under ``name`` (loaded into a slot when a request
        first uses it)."""
        if not self.config.max_loras:
            raise AdapterError("this engine was built with max_loras=0")
        adapter = load_peft_adapter(path, name, self.model.num_layers, self.config.max_lora_rank)
        check_fits(adapter, self.model.projection_shapes(), path if isinstance(path, str) else name)
        self._adapters[name] = AdapterWeights(
            name, adapter.rank, adapter.scale,
            {k: (a.to(self.config.dtype), b.to(self.config.dtype)) for k, (a, b) in adapter.weights.items()})

    def remove_lora(self, name: str) -> bool:
        """Forgets an adapter; refused (False) while a queued or running request uses it."""
        if any(s.lora == name for s in self._seqs.values()):
            return False
        self.scheduler.slots.evict(name)
        return self._adapters.pop(name, None) is not None

    def has_lora(self, name: str) -> bool:
        return name in self._adapters

    def lora_names(self) -> list[str]:
        return sorted(self._adapters)

    def validate(self, request_id: str, prompt_token_ids: list[int], lora: str | None = None,
                 params: SamplingParams | None = None) -> None:
        """Raises InvalidRequestError for input the engine cannot run."""
        if lora is not None and lora not in self._adapters:
            raise InvalidRequestError(f"adapter {lora!r} is not loaded")
        if not prompt_token_ids:
            raise InvalidRequestError("prompt is empty: at least one token is needed")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len}")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size})")
        if request_id in self._seqs:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        if params is not None and params.logit_bias and max(t for t, _ in params.logit_bias) >= self.vocab_size:
            error = InvalidRequestError(f"logit_bias token ids must be in [0, {self.vocab_size})")
            error.param = "logit_bias"
            raise error

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    lora: str | None = None, cache_salt: str | None = None) -> None:
        self.validate(request_id, prompt_token_ids, lora, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, next(self._arrivals), lora=lora,
                       cache_salt=cache_salt)
        try:
            self._check("admission", seq)
            if params.guide is not None:
                seq.guide = params.guide()
            self.runner.add_generator(seq)
        except Exception as exc:
            raise _failed("admission", exc) from exc
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        self.num_admitted += 1

    def abort_request(self, request_id: str) -> bool:
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return False
        seq.finish_reason = FinishReason.ABORT
        self._forget(seq)
        self.num_aborted += 1
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
        """schedule -> load adapters -> run -> postprocess. A fault of one request's stage fails that request
        (its StepOutput carries the error); only a fault of the shared forward pass propagates."""
        batch = self.scheduler.schedule()
        outputs = self._load_loras(batch)
        if not batch.seqs:
            return outputs
        sampled, failures = self.runner.run(batch, self._check)
        for seq in batch.seqs:
            self.block_manager.commit(seq)
        outputs += [self._fail(batch.seqs[row], "sampling", exc) for row, exc in failures.items()]
        for row, (token, lp) in sampled.items():
            seq = batch.seqs[row]
            try:
                self._check("postprocess", seq)
                outputs.append(self._postprocess(seq, token, lp))
            except Exception as exc:
                outputs.append(self._fail(seq, "postprocess", exc))
        return outputs

    def _load_loras(self, batch: ScheduledBatch) -> list[StepOutput]:
        """Writes newly scheduled adapters into their slots; an adapter that fails fails its requests only
        (they leave the batch, their blocks and slot are freed)."""
        failed: list[StepOutput] = []
        for slot, name in batch.lora_loads:
            users = [seq for seq in batch.seqs if seq.lora == name]
            try:
                for seq in users:
                    self._check("adapter load", seq)
                self.runner.load_lora(slot, self._adapters[name])
            except Exception as exc:
                failed += [self._fail(seq, "adapter load", exc) for seq in users]
                self.scheduler.slots.evict(name)
        if failed:
            gone = {out.request_id for out in failed}
            keep = [i for i, seq in enumerate(batch.seqs) if seq.request_id not in gone]
            batch.seqs = [batch.seqs[i] for i in keep]
            batch.num_new_tokens = [batch.num_new_tokens[i] for i in keep]
        return failed

    def _check(self, stage: str, seq: Sequence) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage, seq.request_id)

    def _fail(self, seq: Sequence, stage: str, exc: BaseException) -> StepOutput:
        self.scheduler.abort(seq.request_id)  # frees its blocks and its adapter slot reference
        seq.finish_reason = FinishReason.ABORT
        self._forget(seq)
        return StepOutput(seq.request_id, [], FinishReason.ABORT, seq.num_prompt_tokens, len(seq.output_token_ids),
                          error=_failed(stage, exc))

    def _postprocess(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> StepOutput:
        seq.output_token_ids.append(token)
        p = seq.params
        if seq.guide is not None:
            seq.guide.accept(token)
        if (not p.ignore_eos and token in self.config.eos_token_ids) or token in p.stop_token_ids or (
                seq.guide is not None and seq.guide.is_finished()):
            seq.finish_reason = FinishReason.STOP
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            seq.finish_reason = FinishReason.LENGTH
        if seq.finish_reason is not None:
            self.scheduler.finish(seq)
            self._forget(seq)
        first = len(seq.output_token_ids) == 1 and p.prompt_logprobs is not None
        return StepOutput(seq.request_id, [token], seq.finish_reason, seq.num_prompt_tokens,
                          len(seq.output_token_ids), None if logprob is None else [logprob],
                          seq.prompt_logprobs if first else None, num_cached_tokens=seq.num_cached_tokens or 0)

    def _forget(self, seq: Sequence) -> None:
        self._seqs.pop(seq.request_id, None)
        self.runner.drop_generator(seq.request_id)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 loras: list[str | None] | None = None) -> list[list[int]]:
        """Offline convenience: runs the prompts to completion, returns generated ids in input order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{next(self._arrivals)}" for _ in prompts]
        for rid, prompt, p, lora in zip(ids, prompts, params_list, loras or [None] * len(prompts)):
            self.add_request(rid, prompt, p, lora)
        outputs: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.error is not None:
                    raise out.error
                outputs[out.request_id].extend(out.new_token_ids)
        return [outputs[rid] for rid in ids]


def quantize(hf_model: nn.Module, config: EngineConfig) -> int:
    """Quantizes ``hf_model``'s projections in place as ``config`` asks (int4 group 32 with a GGUF file: its
    Q4 blocks as they are). Returns the quantized weights' bytes (0 for none)."""
    if config.quantization == "none":
        return 0
    blocks = None
    if config.quantization == "int4" and config.quant_group_size == 32 and config.gguf_file:  # Q4 blocks are g32
        blocks = load_int4_projections(config.gguf_file, hf_model, config.dtype)
    return quantize_model(hf_model, config.quantization, config.quant_group_size, config.dtype, blocks)


def _failed(stage: str, exc: BaseException) -> RequestFailedError:
    return RequestFailedError(f"this request failed in {stage} ({type(exc).__name__}: {exc}); other requests "
                              "were not affected")

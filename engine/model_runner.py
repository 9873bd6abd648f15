"""Turns a scheduled batch into tensors, runs the model, returns sampled tokens."""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from .attention import KVCache
from .config import EngineConfig
from .cpu_allocator import keep_freed_memory
from .lora import AdapterWeights, LoRABatch, LoRAPool
from .model import CausalLM
from .quantization import called_modules
from .sampler import TokenLogprob, apply_penalties, compute_logprobs, pick_logprobs, prompt_logprobs, sample, to_device
from .sampling_params import TokenGuide
from .scheduler import ScheduledBatch
from .sequence import Sequence

PROMPT_LOGITS = 1 << 23  # prompt logits scored at once (32 MB of float32): 170 positions of a 49k vocabulary


def num_kv_blocks_for(config: EngineConfig, model: CausalLM) -> int:
    """Blocks that fit the memory budget: a fixed size on CPU, a share of free memory on CUDA."""
    if config.num_kv_blocks is not None:
        return config.num_kv_blocks
    per_block = config.block_size * KVCache.bytes_per_slot(
        model.num_layers, model.num_kv_heads, model.head_dim, config.dtype)
    budget = config.kv_cache_memory_bytes
    if torch.device(config.device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(config.device))
        budget = int(free * config.gpu_memory_utilization)
    return max(1, budget // per_block)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: CausalLM, num_blocks: int) -> None:
        self.config = config
        self.model = model
        if config.cpu_keep_freed_memory and torch.device(config.device).type == "cpu":
            keep_freed_memory()
        self.kv_cache = KVCache(model.num_layers, num_blocks * config.block_size, model.num_kv_heads,
                                model.head_dim, config.dtype, config.device, model.head_major_cache)
        self._generators: dict[str, torch.Generator] = {}
        # Grammar masks are computed here while the forward runs (llguidance and torch release the GIL; on a GPU
        # the forward is asynchronous anyway), so a constrained row waits for its mask only if the mask is slower.
        overlap = config.overlap_masks
        if overlap is None:
            overlap = torch.device(config.device).type == "cuda" or torch.get_num_threads() < (os.cpu_count() or 1)
        self._masker = ThreadPoolExecutor(1, thread_name_prefix="llmaas-mask") if overlap else None
        self.lora_pool = LoRAPool(config.max_loras, config.max_lora_rank, model.num_layers,
                                  model.projection_shapes(), config.dtype, config.device) if config.max_loras else None
        self.device_sampler = None
        if model.decode_graphs:  # the CUDA path samples on the device too, in one launch
            from .device_sampling import DeviceSampler  # imports triton, which only the CUDA path needs

            self.device_sampler = DeviceSampler(config.max_num_seqs, config.device)
        self.graphs = None  # captured by capture_graphs(), once the model's kernels are final
        self._num_blocks = num_blocks
        use_graphs = config.cuda_graphs
        if use_graphs is None:
            use_graphs = model.decode_graphs and torch.device(config.device).type == "cuda"
        if use_graphs and not model.decode_graphs:
            raise ValueError("cuda_graphs needs the triton attention backend")
        self._use_graphs = bool(use_graphs)

    def capture_graphs(self) -> None:
        """Captures the decode steps' CUDA graphs (when the config asks for them): after the quantized projections'
        kernels were chosen (a graph replays the kernels it recorded, whatever is chosen later)."""
        if not self._use_graphs or self.graphs is not None:
            return
        unplanned = [m.shape_key for m in called_modules(self.model.hf_model) if not m.planned]
        if unplanned:
            raise RuntimeError(f"quantized projections {unplanned} have no kernel plan yet: calibrate first")
        from .cuda_graphs import DecodeGraphs  # imports triton, which only the CUDA path needs

        config = self.config
        longest = min(config.max_model_len, self.model.cos.shape[0], self._num_blocks * config.block_size)  # tokens
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.lora_pool, config.max_num_seqs,
                                   -(-longest // config.block_size))

    def load_lora(self, slot: int, adapter: AdapterWeights) -> None:
        assert self.lora_pool is not None
        self.lora_pool.write(slot, adapter)

    def add_generator(self, seq: Sequence) -> None:
        """A new request's random stream: its seed packed for the device sampler, or (CPU path) a generator
        of its own when it has a seed."""
        if self.device_sampler is not None:
            self.device_sampler.add(seq)
        elif seq.params.seed is not None:
            gen = torch.Generator(device=self.config.device)
            gen.manual_seed(seq.params.seed)
            self._generators[seq.request_id] = gen

    def drop_generator(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        if self.device_sampler is not None:
            self.device_sampler.drop(request_id)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, check: Callable[[str, Sequence], None] | None = None
            ) -> tuple[dict[int, tuple[int, TokenLogprob | None]], dict[int, Exception]]:
        """Runs one step. Returns ({batch row: (sampled token, its logprobs if asked)} for rows whose pending
        tokens all ran, {batch row: the error} for rows whose own sampling failed). ``check(stage, seq)`` is
        the engine's per-request fault hook."""
        device = self.config.device
        # Rows grouped by adapter slot, so each adapter's tokens form one contiguous segment.
        order = sorted(range(len(batch)), key=lambda r: -1 if batch.seqs[r].lora_slot is None
                       else batch.seqs[r].lora_slot)
        seqs = [batch.seqs[r] for r in order]
        nums = [batch.num_new_tokens[r] for r in order]
        starts = [seq.num_computed_tokens for seq in seqs]
        ids: list[int] = []
        positions: list[int] = []
        segments: list[tuple[int, int, int]] = []
        sample_rows: list[int] = []
        last_token: list[int] = []  # flat index of each sampling row's last token
        first_token: list[int] = []  # flat index of each row's first token
        for row, seq, start, num in zip(order, seqs, starts, nums):
            first_token.append(len(ids))
            if seq.lora_slot is not None:
                if segments and segments[-1][2] == seq.lora_slot:
                    segments[-1] = (segments[-1][0], len(ids) + num, seq.lora_slot)
                else:
                    segments.append((len(ids), len(ids) + num, seq.lora_slot))
            ids.extend(seq.token_ids()[start:start + num])
            positions.extend(range(start, start + num))
            if start + num == seq.num_tokens:
                sample_rows.append(row)
                last_token.append(len(ids) - 1)
        masks = {batch.seqs[r].request_id: self._mask(batch.seqs[r].guide)
                 for r in sample_rows if batch.seqs[r].guide is not None}  # each [V] logit mask, by sampling time
        try:
            hidden = self._forward(seqs, starts, nums, ids, positions, segments)  # [T, hidden]
        except BaseException:
            wait(masks.values())  # no mask thread may still read a guide when the engine reacts to this
            raise
        failed: dict[int, Exception] = {}  # rows whose own prompt logprobs failed (one request's data, e.g. OOM)
        for row, seq, start, num, first in zip(order, seqs, starts, nums, first_token):
            if seq.params.prompt_logprobs is not None:
                try:
                    self._prompt_logprobs(seq, hidden[first:first + num], start)
                except Exception as exc:
                    failed[row] = exc
            seq.num_computed_tokens += num
        if failed:
            kept = [(r, t) for r, t in zip(sample_rows, last_token) if r not in failed]
            sample_rows, last_token = [r for r, _ in kept], [t for _, t in kept]
        if not sample_rows:
            return {}, failed
        # every token a sampling row's last (a decode step): the rows are the hidden states as they are, no copy
        last_hidden = hidden if len(last_token) == hidden.shape[0] else hidden[to_device(last_token, device)]
        out, failures = self._sample_rows(batch, last_hidden, sample_rows, masks, check)
        return out, {**failures, **failed}

    def _forward(self, seqs: list[Sequence], starts: list[int], nums: list[int], ids: list[int],
                 positions: list[int], segments: list[tuple[int, int, int]]) -> torch.Tensor:
        """The model over the step's flat tokens: a captured decode graph when one fits, else eagerly."""
        tables = [s.block_table for s in seqs]
        if self.graphs is not None and max(nums) == 1 and self.graphs.fits(len(seqs), max(map(len, tables))):
            return self.graphs.run(ids, positions, tables, [s.lora_slot for s in seqs], self.config.block_size)
        device = self.config.device
        meta = self.model.build_metadata(starts, nums, tables, self.config.block_size, device)
        input_ids = to_device(ids, device, torch.long)  # [T]
        pos = to_device(positions, device, torch.long)  # [T]
        lora = self.model.prepare_lora(LoRABatch(segments), self.lora_pool, len(ids), device)
        return self.model(input_ids, pos, meta, self.kv_cache, lora, self.lora_pool)

    def _sample_rows(self, batch: ScheduledBatch, last_hidden: torch.Tensor, sample_rows: list[int],
                     masks: dict[str, Future[torch.Tensor]], check: Callable[[str, Sequence], None] | None
                     ) -> tuple[dict[int, tuple[int, TokenLogprob | None]], dict[int, Exception]]:
        """Samples the rows whose pending tokens all ran. last_hidden: [R, hidden], one per sample row."""
        logits = self.model.compute_logits(last_hidden)  # [R, V], shared
        sampled = [batch.seqs[r] for r in sample_rows]
        # penalties and guides edit logits in place: keep the original for the row-by-row fallback
        penalized = any(s.params.penalized or s.guide is not None for s in sampled)
        states = {s.request_id: g.get_state() for s in sampled if (g := self._generators.get(s.request_id))}
        try:
            for seq in sampled:
                if check is not None:
                    check("sampling", seq)
            results = self._sample(logits.clone() if penalized else logits, sampled, masks)
            return dict(zip(sample_rows, results)), {}
        except Exception:
            pass
        # The batched sampler failed: sample row by row from the same logits and random state, so a fault of one
        # row's data stays with its request and every other row gets the token it would have. A fault every row
        # meets is the step's own (device): raised, so the loop fails loudly and the replica is replaced.
        for request_id, state in states.items():
            self._generators[request_id].set_state(state)
        out: dict[int, tuple[int, TokenLogprob | None]] = {}
        failures: dict[int, Exception] = {}
        for j, (row, seq) in enumerate(zip(sample_rows, sampled)):
            try:
                if check is not None:
                    check("sampling", seq)
                out[row] = self._sample(logits[j:j + 1].clone(), [seq], masks)[0]
            except Exception as exc:
                failures[row] = exc
        if len(sampled) > 1 and not out:
            raise next(iter(failures.values()))
        return out, failures

    def _mask(self, guide: TokenGuide) -> Future[torch.Tensor]:
        if self._masker is not None:
            return self._masker.submit(guide.logit_mask, self.model.vocab_size)
        done: Future[torch.Tensor] = Future()
        try:
            done.set_result(guide.logit_mask(self.model.vocab_size))
        except Exception as exc:  # raised where the mask is used: the row's sampling fails, not the step
            done.set_exception(exc)
        return done

    def _prompt_logprobs(self, seq: Sequence, hidden: torch.Tensor, start: int) -> None:
        """Appends the log-probabilities of the prompt tokens this chunk's positions predict (position p's logits
        are token p + 1's). hidden: [num, hidden] for positions start .. start + num - 1."""
        first = max(start, len(seq.prompt_logprobs))  # a preempted, recomputed prompt is not counted twice
        end = min(start + hidden.shape[0], seq.num_prompt_tokens - 1)
        rows = max(1, PROMPT_LOGITS // self.model.vocab_size)
        for lo in range(first, end, rows):
            hi = min(lo + rows, end)
            logits = self.model.compute_logits(hidden[lo - start:hi - start])  # [hi - lo, V]
            seq.prompt_logprobs += prompt_logprobs(logits, seq.prompt_token_ids[lo + 1:hi + 1],
                                                   seq.params.prompt_logprobs or 0)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], masks: dict[str, Future[torch.Tensor]]
                ) -> list[tuple[int, TokenLogprob | None]]:
        """logits: [R, V] for ``seqs`` -> (token, logprobs if asked) per row; ``masks``: the guided rows' logit
        masks, by request id (a failed guide raises here, for its row alone in the row-by-row fallback)."""
        params = [s.params for s in seqs]
        logprobs = compute_logprobs(logits, params)  # before sampling: penalties edit logits in place
        guided = [j for j, seq in enumerate(seqs) if seq.guide is not None]
        if guided:  # tokens the grammar rules out cannot be sampled (logprobs stay raw); one copy to the device
            mask = torch.stack([masks[seqs[j].request_id].result() for j in guided]).to(logits.device)  # [G, V]
            if len(guided) == len(seqs):
                logits.add_(mask)
            else:
                logits.index_add_(0, torch.tensor(guided, device=logits.device), mask)
        prompts, outputs = [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs]
        if self.device_sampler is not None:
            if any(p.penalized for p in params):
                logits = apply_penalties(logits, params, prompts, outputs)
            tokens = self.device_sampler.sample(logits, seqs).tolist()
        else:
            tokens = sample(logits, params, [self._generators.get(s.request_id) for s in seqs], prompts,
                            outputs).tolist()
        picked = pick_logprobs(logprobs, tokens, params)
        return [(token, picked.get(j)) for j, token in enumerate(tokens)]

"""Turns a scheduled batch into tensors, runs the model, returns sampled tokens."""
from __future__ import annotations

import torch

from .attention import KVCache, build_metadata
from .config import EngineConfig
from .model import CausalLM
from .sampler import sample
from .scheduler import ScheduledBatch
from .sequence import Sequence


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
        self.kv_cache = KVCache(model.num_layers, num_blocks * config.block_size, model.num_kv_heads,
                                model.head_dim, config.dtype, config.device)
        self._generators: dict[str, torch.Generator] = {}

    def add_generator(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            gen = torch.Generator(device=self.config.device)
            gen.manual_seed(seq.params.seed)
            self._generators[seq.request_id] = gen

    def drop_generator(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def run(self, batch: ScheduledBatch) -> dict[int, int]:
        """Runs one step. Returns {batch row: sampled token} for rows whose pending tokens all ran."""
        device = self.config.device
        starts = [seq.num_computed_tokens for seq in batch.seqs]
        ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        last_token: list[int] = []  # flat index of each sampling row's last token
        for row, (seq, start, num) in enumerate(zip(batch.seqs, starts, batch.num_new_tokens)):
            ids.extend(seq.token_ids()[start:start + num])
            positions.extend(range(start, start + num))
            if start + num == seq.num_tokens:
                sample_rows.append(row)
                last_token.append(len(ids) - 1)
        meta = build_metadata(starts, batch.num_new_tokens, [s.block_table for s in batch.seqs],
                              self.config.block_size, device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=device)  # [T]
        pos = torch.tensor(positions, dtype=torch.long, device=device)  # [T]
        hidden = self.model(input_ids, pos, meta, self.kv_cache)  # [T, hidden]
        for seq, num in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num
        if not sample_rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(last_token, device=device)])  # [R, V]
        seqs = [batch.seqs[r] for r in sample_rows]
        tokens = sample(logits, [s.params for s in seqs], [self._generators.get(s.request_id) for s in seqs])
        return dict(zip(sample_rows, tokens.tolist()))

"""The CUDA path's forward: fused weights and Triton kernels over the same paged KV cache.

Per layer a decode step runs 9 kernels with LoRA off (``benchmarks/op_count.py`` counts them): fused
residual-add + RMSNorm, one QKV GEMM, RoPE with the K/V cache write, paged attention (+1 split-K merge for long
contexts), the o_proj GEMM, add + RMSNorm, one gate_up GEMM, SiLU * up, the down GEMM. The CPU path
(``model.CausalLM``) runs torch ops over the same fused weights with a gathered attention.

``CausalLM`` and this class share weights (fused q/k/v and gate/up) and RoPE tables, and answer the same two calls
the model runner makes: ``build_metadata`` (the step's attention metadata) and ``prepare_lora`` (the step's
adapter layout); ``model.build_model`` picks one by the engine's ``attention_backend``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from .config import triton_block_size_ok
from .kernels import paged_attention, sgmv
from .kernels.ops import kernel_ops
from .lora import GROUPS, LoRABatch, LoRAPool
from .model import CausalLM
from .sampler import to_device

QKV, GATE_UP = GROUPS


@dataclass(slots=True)
class KernelMetadata:
    """Per-step tensors shared by every layer (device-side)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot each new token's K/V is written to
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with block 0 (never read past seq_lens)
    seq_lens: torch.Tensor  # [B] int32, tokens cached per sequence after this step
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, cumulative new tokens per sequence
    max_query_len: int  # 1: a decode-only step (token b is sequence b)
    num_splits: int  # split-K factor of decode attention


def cache_slot(table: list[int], position: int, block_size: int) -> int:
    """The KV-cache slot of a sequence's token at ``position``, through its block table."""
    return table[position // block_size] * block_size + position % block_size


def build_kernel_metadata(starts: list[int], num_new: list[int], block_tables: list[list[int]], block_size: int,
                          device: torch.device | str, kv_heads: int, num_sms: int) -> KernelMetadata:
    """The kernels' metadata for sequences whose new tokens sit at positions ``starts[i]:starts[i] + num_new[i]``
    (argument meanings as ``attention.build_metadata``)."""
    width = max(len(t) for t in block_tables)
    slots = [cache_slot(table, p, block_size)
             for start, num, table in zip(starts, num_new, block_tables) for p in range(start, start + num)]
    return KernelMetadata(
        slot_mapping=to_device(slots, device, torch.int64),
        block_tables=to_device([t + [0] * (width - len(t)) for t in block_tables], device, torch.int32),
        seq_lens=to_device([s + n for s, n in zip(starts, num_new)], device, torch.int32),
        cu_seqlens_q=to_device([0, *itertools.accumulate(num_new)], device, torch.int32),
        max_query_len=max(num_new),
        num_splits=paged_attention.choose_num_splits(len(starts), kv_heads, width, num_sms),
    )


@dataclass(slots=True)
class KernelLoRA:
    """The step's adapters as the SGMV kernels take them."""

    plan: sgmv.TokenPlan
    scales: torch.Tensor  # [num_slots] float32, alpha / r per slot


class TritonCausalLM(CausalLM):
    """``CausalLM`` with fused QKV / gate_up weights and the Triton kernels (``engine/kernels``)."""

    decode_graphs = True  # a decode step has fixed shapes given fixed-width block tables (cuda_graphs.py)
    head_major_cache = False  # the kernels read a token's KV heads side by side

    def __init__(self, hf_model: nn.Module, max_model_len: int, block_size: int) -> None:
        super().__init__(hf_model, max_model_len)
        if not triton_block_size_ok(block_size):
            raise ValueError(f"the triton attention backend needs a power-of-two block_size >= 16, got {block_size}")
        self.block_size = block_size
        device = self.cos.device
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        self.eps = self.layers[0].input_layernorm.variance_epsilon
        self.ops = kernel_ops()

    def build_metadata(self, starts: list[int], num_new: list[int], block_tables: list[list[int]], block_size: int,
                       device: torch.device | str) -> KernelMetadata:
        return build_kernel_metadata(starts, num_new, block_tables, block_size, device, self.num_kv_heads,
                                     self.num_sms)

    def prepare_lora(self, batch: LoRABatch, pool: LoRAPool | None, num_tokens: int,
                     device: torch.device | str) -> KernelLoRA | None:
        """Per-token adapter slots from the batch's segments, grouped by slot on the device."""
        if pool is None or not batch.segments:
            return None
        token_slots = [sgmv.NO_ADAPTER] * num_tokens
        for start, end, slot in batch.segments:
            token_slots[start:end] = [slot] * (end - start)
        plan = sgmv.plan_tokens(torch.tensor(token_slots, dtype=torch.int32, device=device), len(pool.scale))
        return KernelLoRA(plan, torch.tensor(pool.scale, dtype=torch.float32, device=device))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: KernelMetadata, kv_cache,
                lora: KernelLoRA | None = None, pool: LoRAPool | None = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens]. Returns final hidden states [num_tokens, hidden]."""
        t = input_ids.shape[0]
        use_lora = lora is not None and pool is not None
        residual = self.hf_model.model.embed_tokens(input_ids)  # [T, hidden], updated in place by add_rmsnorm
        x = self.ops.add_rmsnorm(residual, self.layers[0].input_layernorm.weight, self.eps, None)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv = self.qkv[i](x)  # [T, q + 2 kv]
            if use_lora:
                self._lora_group(qkv, x, i, QKV, lora, pool)
            q = qkv[:, :self.q_width].view(t, self.num_heads, self.head_dim)
            k = qkv[:, self.q_width:self.q_width + self.kv_width].view(t, self.num_kv_heads, self.head_dim)
            v = qkv[:, self.q_width + self.kv_width:].view(t, self.num_kv_heads, self.head_dim)
            k_cache, v_cache = kv_cache.k[i], kv_cache.v[i]
            self.ops.rope_and_cache(q, k, v, self.cos, self.sin, positions, k_cache, v_cache, meta.slot_mapping)
            o = self._attention(q, k_cache, v_cache, meta).view(t, self.q_width)  # [T, H * D]
            o = self._project(attn.o_proj, o, i, "o_proj", lora, pool)
            x = self.ops.add_rmsnorm(o, layer.post_attention_layernorm.weight, self.eps, residual)
            gate_up = self.gate_up[i](x)  # [T, 2 * intermediate]
            if use_lora:
                self._lora_group(gate_up, x, i, GATE_UP, lora, pool)
            down = self._project(mlp.down_proj, self.ops.silu_mul(gate_up), i, "down_proj", lora, pool)
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.hf_model.model.norm
            x = self.ops.add_rmsnorm(down, norm.weight, self.eps, residual)
        return x

    def _attention(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   meta: KernelMetadata) -> torch.Tensor:
        if meta.max_query_len == 1:
            return self.ops.decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                             self.block_size, meta.num_splits)
        return self.ops.prefill_attention(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                          meta.max_query_len, self.scale, self.block_size)

    def _project(self, module: nn.Module, x: torch.Tensor, layer: int, name: str, lora: KernelLoRA | None,
                 pool: LoRAPool | None) -> torch.Tensor:
        y = module(x)
        if lora is not None and pool is not None:
            self._lora(y, self._shrink(x, pool.a[name][layer], lora), pool.b[name][layer], lora, 0, 0)
        return y

    def _lora_group(self, y: torch.Tensor, x: torch.Tensor, layer: int, modules: tuple[str, ...], lora: KernelLoRA,
                    pool: LoRAPool) -> None:
        """LoRA deltas of a projection group written into its fused output's columns: one shrink for the group
        when the pool keeps its A stacked, one expand per module."""
        stacked = pool.a_groups.get(modules)
        ax = self._shrink(x, stacked[layer], lora) if stacked is not None else None
        col = 0
        for j, (module, width) in enumerate(zip(modules, self.widths[modules])):
            if stacked is not None:
                self._lora(y, ax, pool.b[module][layer], lora, j * pool.max_rank, col)
            else:
                self._lora(y, self._shrink(x, pool.a[module][layer], lora), pool.b[module][layer], lora, 0, col)
            col += width

    def _shrink(self, x: torch.Tensor, a: torch.Tensor, lora: KernelLoRA) -> torch.Tensor:
        plan = lora.plan
        return self.ops.lora_shrink(x, a, plan.order, plan.starts, plan.counts)

    def _lora(self, y: torch.Tensor, ax: torch.Tensor, b: torch.Tensor, lora: KernelLoRA, r0: int, col0: int) -> None:
        plan = lora.plan
        self.ops.lora_expand(y, ax, b, lora.scales, plan.order, plan.starts, plan.counts, r0, col0)

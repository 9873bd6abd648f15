"""The CUDA path's forward (fused weights + Triton kernels) run end to end on CPU with the kernels in Triton's
interpreter: greedy tokens equal the CPU path's (and so transformers') for prompts that cross KV blocks, with
chunked prefills that mix prefill and decode rows in one step, and with LoRA adapters beside base rows."""
from __future__ import annotations

import pytest
import torch

from llmaas.engine import SamplingParams
from llmaas.engine import triton_model as tm
from tests.models import make_peft_adapter

from .tiny_engine import make_engine, random_prompts

NUM_NEW = 6
pytestmark = pytest.mark.usefixtures("interpreted_kernels")


def test_triton_engine_has_the_fused_forward(tiny_base_dir):
    engine = make_engine(tiny_base_dir, "triton")
    assert isinstance(engine.model, tm.TritonCausalLM)
    layer = engine.model.layers[0].self_attn
    qkv = engine.model.qkv[0].weight
    assert layer.k_proj.weight.data_ptr() == qkv[layer.q_proj.out_features:].data_ptr()  # a view: no second copy
    assert type(make_engine(tiny_base_dir, "auto").model) is not tm.TritonCausalLM  # auto on CPU: the torch path


def test_greedy_tokens_match_the_cpu_path_with_mixed_chunked_steps(tiny_base_dir):
    # A 24-token budget: the 40-token prompt prefills in chunks while the others decode (mixed steps).
    prompts = random_prompts((3, 17, 40), seed=1)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    want = make_engine(tiny_base_dir, "torch").generate(prompts, params)
    assert make_engine(tiny_base_dir, "triton").generate(prompts, params) == want


def test_lora_rows_beside_base_rows_match_the_cpu_path(tiny_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    paths = [make_peft_adapter(base, tmp_path / f"a{i}", seed=10 + i, r=4 + 4 * i) for i in range(2)]
    prompts = random_prompts((5, 9, 18), seed=2)
    loras = ["a0", None, "a1"]
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    results = []
    for backend in ("torch", "triton"):
        engine = make_engine(tiny_base_dir, backend)
        for i, path in enumerate(paths):
            engine.add_lora(f"a{i}", path)
        results.append(engine.generate(prompts, params, loras))
    want, got = results
    assert got == want
    assert want != make_engine(tiny_base_dir, "torch").generate(prompts, params)  # the adapters change the tokens

"""The CUDA path's forward (fused weights + Triton kernels) run end to end on CPU with the kernels in Triton's
interpreter: greedy tokens equal the CPU path's (and so transformers') for prompts that cross KV blocks, with
chunked prefills that mix prefill and decode rows in one step, and with LoRA adapters beside base rows."""
from __future__ import annotations

import pytest
import torch

from llmaas.engine import SamplingParams
from llmaas.engine import triton_model as tm
from tests.models import make_peft_adapter

from .tiny_engine import make_engine, random_prompts, run_quantized_with

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


def test_seeded_sampling_on_the_device_ignores_batch_mates_and_sorts_nothing(tiny_base_dir):
    """The CUDA path samples in the device kernel: a seeded request gets the same tokens alone and beside
    other requests, and its top-p/top-k rows sort nothing (the CPU path's do)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    prompts = random_prompts((5, 9, 12), seed=3)
    seeded = SamplingParams(max_tokens=NUM_NEW, temperature=1.0, top_p=0.9, top_k=40, seed=1234, ignore_eos=True)
    others = [SamplingParams(max_tokens=NUM_NEW, temperature=0.7, top_p=0.8, ignore_eos=True),
              SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)]
    engine = make_engine(tiny_base_dir, "triton")
    assert engine.runner.device_sampler is not None
    alone = engine.generate(prompts[:1], seeded)
    with Ops() as ops:
        together = engine.generate(prompts, [seeded, *others])
    assert together[0] == alone[0]
    assert together[2] == make_engine(tiny_base_dir, "torch").generate(prompts[2:], others[1])[0]  # greedy row
    assert make_engine(tiny_base_dir, "triton").generate(prompts[:1], seeded) == alone  # another engine
    assert engine.generate(prompts[:1], SamplingParams(**{**_fields(seeded), "seed": 99})) != alone
    assert "sort" not in ops.names and "cumsum" not in ops.names
    with Ops() as cpu_ops:
        make_engine(tiny_base_dir, "torch").generate(prompts, [seeded, *others])
    assert "sort" in cpu_ops.names  # the check sees a sort where there is one


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in ("max_tokens", "temperature", "top_p", "top_k", "ignore_eos")}


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
@pytest.mark.usefixtures("cuda_quantized_layout")
def test_quantized_base_through_the_triton_gemm_matches_the_cpu_path(tiny_base_dir, mode):
    """A quantized base on the CUDA path, every projection and the LM head through the w8a16 / w4a16 Triton GEMM
    (``quant_matmul``, interpreted) in the plain-nibble layout the CUDA path packs int4 in: greedy tokens equal
    the CPU path's with the same quantized weights (dequantize + GEMM), over chunked mixed steps."""
    def engine_with(backend: str, kernel: str):
        engine = make_engine(tiny_base_dir, backend, quantization=mode, quant_group_size=32)
        run_quantized_with(engine, kernel)
        return engine

    prompts = random_prompts((3, 17, 40), seed=4)
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True)
    want = engine_with("torch", "dequant").generate(prompts, params)
    assert engine_with("triton", "triton").generate(prompts, params) == want

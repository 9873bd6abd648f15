"""Weight-only int8 / int4: formats round-trip, every kernel matches its dequantized reference, the measured
plan is kept per machine, GGUF Q4 blocks load bit for bit, and a quantized tiny Llama serves with adapters."""
from __future__ import annotations

import copy
import json
import tempfile

import pytest
import torch
from torch.nn import functional as F

from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from llmaas.engine.gguf import load_int4_projections, q4_blocks
from llmaas.engine.kernel_plan import calibrate
from llmaas.engine.quantization import (
    FUSED,
    M_BUCKETS,
    QuantizedLinear,
    bucket,
    cpu_int4_block,
    dequantize_int4,
    dequantize_int8,
    fuse,
    int4_block_for,
    pack_int4,
    pack_scales_zeros,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
)
from tests.models import make_peft_adapter, tiny_llama


def test_int8_round_trip_is_within_half_a_step_per_channel():
    w = torch.randn(96, 80) * torch.linspace(0.1, 3, 96)[:, None]  # channels of different ranges
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (dequantize_int8(q, scales, torch.float32) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(dim=1) == 127).all()  # each channel's largest weight uses the whole range


def test_fp8_round_trip_is_within_e4m3_rounding_and_survives_a_dtype_cast(caplog):
    w = torch.randn(64, 80) * torch.linspace(0.1, 3, 64)[:, None]
    q, scales = quantize_fp8(w)
    assert q.dtype == torch.uint8  # e4m3 bits: Module.to(dtype) casts floating-point buffers, not these
    codes = q.view(torch.float8_e4m3fn).float()
    assert (codes.abs().amax(dim=1) == 448).all()  # each channel's largest weight uses the whole range
    back = codes * scales[:, None]
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value (normals) or 2^-10 * scale (subnormals)
    assert ((back - w).abs() <= w.abs() / 16 + scales[:, None] * 2 ** -10 + 1e-7).all()
    module = QuantizedLinear.from_float(torch.nn.Linear(80, 64, bias=False), "fp8", 32, torch.float32)
    before = module.dequantize(torch.float32)
    module.to(torch.bfloat16)
    assert module.qweight.dtype == torch.uint8 and module.dtype == torch.bfloat16
    torch.testing.assert_close(module.dequantize(torch.float32), before, atol=0, rtol=2 ** -8)  # scales in bf16
    with pytest.raises(ValueError, match="uint8 bits"):  # float8 codes would not survive that cast
        QuantizedLinear("fp8", 80, 64, q.view(torch.float8_e4m3fn), scales, torch.float32)
    with caplog.at_level("WARNING", logger="llmaas.engine.quantization"):
        quantize_model(tiny_llama(), "fp8", 32, torch.float32)
    assert "fp8 weights run as dequantize + GEMM on cpu" in caplog.text  # no fp8 GEMM here: the user is told


@pytest.mark.parametrize("rows", [128, 48])  # torch's CPU kernel layout (N % 64 == 0) and plain nibbles
def test_int4_round_trip_and_packing(rows):
    w = torch.randn(rows, 96)
    q, sz = quantize_int4(w, 32)
    assert sz.shape == (3, rows, 2) and int(q.min()) >= 0 and int(q.max()) <= 15
    step = sz[..., 0].transpose(0, 1).repeat_interleave(32, dim=1)  # [N, K]: each weight's group scale
    assert ((dequantize_int4(q, sz, torch.float32) - w).abs() <= step / 2 + 1e-6).all()
    block = int4_block_for(q)
    assert block == (cpu_int4_block() if rows % 64 == 0 else 0)  # 48 rows fill no block of torch's layout
    assert int4_block_for(q, "cuda") == 0  # packed for a GPU (a GGUF read on the host): what its kernel reads
    packed = pack_int4(q, block)
    assert packed.dtype == torch.uint8 and packed.numel() == q.numel() // 2
    assert torch.equal(unpack_int4(packed, rows, 96, block), q.to(torch.uint8))
    if block:  # the layout is torch's: its kernel multiplies by what we unpack
        x = torch.randn(3, 96)
        torch.testing.assert_close(torch._weight_int4pack_mm_for_cpu(x, packed, 32, sz),
                                   x @ dequantize_int4(q, sz, torch.float32).T, atol=1e-4, rtol=1e-4)


def test_int4_rejects_features_that_do_not_fill_groups():
    with pytest.raises(ValueError, match="group size"):
        quantize_int4(torch.randn(64, 48), 32)


def modules(dtype):
    torch.manual_seed(0)
    for mode, shape in (("int8", (192, 96)), ("int4", (128, 64)), ("int4", (48, 64)), ("fp8", (64, 96))):
        linear = torch.nn.Linear(shape[1], shape[0], bias=False)
        yield QuantizedLinear.from_float(linear, mode, 32, dtype).to(dtype), linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_matches_the_dequantized_reference(dtype):
    seen = set()
    for module, linear in modules(dtype):
        kernels = module.kernels()
        assert "dequant" in kernels
        assert ("packed-bfloat16" in kernels) == (module.mode == "int8" or module.block > 0)
        weight = module.dequantize(torch.float32)
        # the quantized weight is the float one to within the format's step
        assert (weight - linear.weight).abs().max() < 0.1 * linear.weight.abs().max()
        for m in (1, 5, 70):
            x = torch.randn(m, module.in_features).to(dtype)
            ref = F.linear(x.float(), weight)
            for name, kernel in kernels.items():
                y = kernel(x)
                assert y.dtype == dtype and y.shape == (m, module.out_features)
                tol = 1e-4 if dtype == torch.float32 and "bfloat16" not in name else 3e-2
                torch.testing.assert_close(y.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)
                seen.add(name)
    assert {"dequant", "packed-bfloat16"} <= seen


def test_a_fused_module_computes_its_parts_outputs_from_their_shared_weight():
    torch.manual_seed(1)
    for mode, sizes in (("int8", (64, 32, 32)), ("int4", (128, 64, 64)), ("int4", (48, 16, 16)), ("fp8", (32, 16))):
        parts = [QuantizedLinear.from_float(torch.nn.Linear(64, n, bias=False), mode, 32, torch.float32)
                 for n in sizes]
        before = [p.dequantize() for p in parts]
        fused = fuse(parts)
        assert fused is not None and fused.out_features == sum(sizes)
        assert all(p.qweight.untyped_storage().data_ptr() == fused.qweight.untyped_storage().data_ptr()
                   for p in parts)  # stored once
        assert all(torch.equal(p.dequantize(), w) for p, w in zip(parts, before))
        x = torch.randn(5, 64)
        for name, kernel in fused.kernels().items():
            torch.testing.assert_close(kernel(x), torch.cat([p.kernels()[name](x) for p in parts], dim=-1))
    mixed = [QuantizedLinear.from_float(torch.nn.Linear(64, n, bias=False), "int4", 32, torch.float32)
             for n in (64, 32)]  # torch's CPU layout and plain nibbles: not fusable
    assert fuse(mixed) is None


def test_a_kernel_this_machine_cannot_run_is_no_candidate(monkeypatch):
    from llmaas.engine.kernel_plan import measure_plan

    def missing_op(self, act):
        def run(x):
            raise RuntimeError("no kernel for this CPU")
        return run

    def fails_from_16_rows(self, act):
        def run(x):
            if x.shape[0] >= 16:
                raise RuntimeError("no kernel for this size")
            return F.linear(x, self.dequantize())
        return run

    module = QuantizedLinear.from_float(torch.nn.Linear(64, 128, bias=False), "int8", 32, torch.float32)
    for kernel in (missing_op, fails_from_16_rows):
        monkeypatch.setattr(QuantizedLinear, "_packed", kernel)
        packed = [name for name in module.kernels() if name.startswith("packed")]
        assert packed
        plan = measure_plan(module)  # the engine still starts
        assert len(plan) == len(M_BUCKETS) and not set(packed) & set(plan[M_BUCKETS.index(16):])
        assert kernel is fails_from_16_rows or not set(packed) & set(plan)


def test_calibration_measures_once_per_machine_and_plans_every_bucket(tmp_path):
    model = tiny_llama()
    quantize_model(model, "int4", 32, torch.float32)
    cache = tmp_path / "kernels.json"
    first = calibrate(model, torch.float32, str(cache))
    assert first.seconds > 0 and set(first.plans) == {m.shape_key for m in model.modules()  # what the engine
                                                      if isinstance(m, QuantizedLinear) and not m.in_fused}
    assert all(len(plan) == len(M_BUCKETS) for plan in first.plans.values())
    (entry,) = json.loads(cache.read_text()).values()
    assert {k: tuple(v["plan"]) for k, v in entry.items()} == first.plans
    again = calibrate(model, torch.float32, str(cache))
    assert again.seconds == 0 and again.plans == first.plans  # read back, not measured
    data = json.loads(cache.read_text())
    (key,) = data
    shape = next(iter(data[key]))
    data[key][shape]["candidates"].remove("dequant-bfloat16")  # measured before that kernel existed
    cache.write_text(json.dumps(data))
    assert calibrate(model, torch.float32, str(cache)).seconds > 0  # a kernel added since: measured again
    assert set(json.loads(cache.read_text())[key][shape]["candidates"]) >= {"dequant", "dequant-bfloat16"}
    assert calibrate(model, torch.bfloat16, str(cache)).seconds > 0  # another compute dtype: its own entry
    cache.write_text("{not json")  # a damaged cache is measured anew, never fatal
    assert calibrate(model, torch.float32, str(cache)).seconds > 0


def test_a_quantized_engine_generates_what_its_dequantized_weights_do():
    """A quantized tiny Llama vs a float copy holding exactly the dequantized weights: with every projection
    on the dequantize kernel (fp32, exact), greedy tokens are identical, with and without an adapter on top
    (the other kernels' accuracy is the test above: bf16 activations would make a token-level comparison
    hinge on near-ties)."""
    base = tiny_llama(seed=3, num_key_value_heads=4)  # k/v of 64 rows: int4 q/k/v fuse in torch's layout
    for mode in ("int8", "int4", "fp8"):
        quantized = copy.deepcopy(base)
        held = quantize_model(quantized, mode, 32, torch.float32)
        assert 0 < held < sum(p.numel() * 4 for p in base.parameters())
        reference = copy.deepcopy(base)
        for name, module in quantized.named_modules():
            if isinstance(module, QuantizedLinear) and name.rpartition(".")[2] not in FUSED.values():
                reference.get_submodule(name).weight.data.copy_(module.dequantize(torch.float32))
        adapter = make_peft_adapter(base, tempfile.mkdtemp(), seed=7, b_std=1.0)
        prompts = [[5, 9, 2, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        outputs = []
        for model, quantization in ((reference, "none"), (copy.deepcopy(base), mode)):
            engine = LLMEngine(model, EngineConfig(max_model_len=64, num_kv_blocks=16, block_size=4,
                                                   quantization=quantization))
            if quantization != "none":
                assert engine.calibration is not None and engine.quantized_bytes == held
                assert isinstance(engine.model.hf_model.lm_head, QuantizedLinear)
                for module in model.modules():
                    if isinstance(module, QuantizedLinear):
                        module.use((module.kernels()["dequant"],) * len(M_BUCKETS))
            engine.add_lora("a", adapter)
            outputs.append(engine.generate(prompts, params) + engine.generate(prompts, params, loras=["a", "a"]))
        ref_out, q_out = outputs
        assert q_out == ref_out, mode
        assert ref_out[:2] != ref_out[2:]  # the adapter changes the output


# --------------------------------------------------------------------------------------------------------------
# GGUF: the default model's own Q4_1 blocks

def test_q4_blocks_decode_like_llama_cpp():
    """Q4_0 / Q4_1 blocks built by hand with gguf's own quantizer decode to what gguf's dequantizer gives."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    for kind in ("Q4_0", "Q4_1"):
        qtype = GGMLQuantizationType[kind]
        try:
            raw = quants.quantize(w, qtype)
        except NotImplementedError:  # older gguf releases quantize Q8_0 only
            pytest.skip(f"gguf cannot quantize {kind} here")
        q, scales, zeros = q4_blocks(raw, kind)
        ours = dequantize_int4(q, pack_scales_zeros(scales, zeros), torch.float32)
        torch.testing.assert_close(ours, torch.from_numpy(quants.dequantize(raw, qtype)), atol=1e-6, rtol=0)


def test_the_default_gguf_loads_as_int4_exactly_as_transformers_dequantizes_it(default_model_dir):
    """Our int4 modules straight from the GGUF file dequantize to the converted checkpoint's weights (which
    transformers produced by dequantizing the same file), q/k row permutation included."""
    from transformers import AutoModelForCausalLM

    from llmaas.app.model_source import _default_gguf

    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    loaded = load_int4_projections(str(_default_gguf()), model, torch.float32)
    assert len(loaded) == 7 * model.config.num_hidden_layers
    for path, module in loaded.items():
        want = model.get_submodule(path).weight
        torch.testing.assert_close(module.dequantize(torch.float32), want, atol=1e-6, rtol=0, msg=path)


def test_bucket_is_the_smallest_holding_the_rows():
    import bisect

    for rows in range(1, 2 * M_BUCKETS[-1]):
        assert bucket(rows) == min(bisect.bisect_left(M_BUCKETS, rows), len(M_BUCKETS) - 1)

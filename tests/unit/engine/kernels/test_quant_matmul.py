"""The w8a16 / w4a16 GEMM against QuantizedLinear's own dequantized weight, in the interpreter, over the
engine's stored formats (int8 and fp8 per channel; int4 nibbles along K with scales and zeros per group): decode and
prefill row counts, ragged N and K, split K, and through QuantizedLinear's kernel table."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from llmaas.engine.quantization import QuantizedLinear, pack_int4, quantize_fp8, quantize_int4, quantize_int8

from .interpreter import interpreted

qmm = interpreted("quant_matmul")


def module(mode: str, n_out: int, n_in: int, group: int, dtype: torch.dtype, seed: int = 0) -> QuantizedLinear:
    """A QuantizedLinear in the CUDA layout (int4: plain nibbles, block 0) of a random weight."""
    w = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(seed)) / n_in ** 0.5
    if mode in ("int8", "fp8"):
        q, scales = quantize_int8(w) if mode == "int8" else quantize_fp8(w)
        return QuantizedLinear(mode, n_in, n_out, q, scales, dtype)
    q, scales_zeros = quantize_int4(w, group)
    return QuantizedLinear("int4", n_in, n_out, pack_int4(q, 0), scales_zeros, dtype, block=0)


def reference(m: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return x.double() @ m.dequantize(torch.float32).double().T


CASES = [  # mode, N, K, group, rows, num_sms
    ("int8", 80, 96, 0, 1, 1),  # N and K not multiples of the tiles
    ("int8", 64, 256, 0, 5, 8),  # split K: 2 K tiles across the SMs
    ("int8", 64, 600, 0, 1, 2),  # 5 K tiles split 3 + 2, the last one ragged
    ("int8", 48, 64, 0, 33, 1),  # a prefill tile of 64 rows, 31 masked
    ("fp8", 80, 96, 0, 1, 1),
    ("fp8", 64, 256, 0, 20, 8),
    ("int4", 80, 128, 32, 1, 1),  # 4 groups, K tiles of one group each
    ("int4", 64, 256, 64, 3, 16),  # split K over groups of 64
    ("int4", 40, 256, 128, 20, 1),  # prefill tiles of 32 rows; a K tile of 64 is half a group
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("mode", "n_out", "n_in", "group", "rows", "num_sms"), CASES,
                         ids=[f"{c[0]}-{c[1]}x{c[2]}-g{c[3]}-m{c[4]}-sms{c[5]}" for c in CASES])
def test_quant_matmul_matches_the_dequantized_weight(mode, n_out, n_in, group, rows, num_sms, dtype):
    m = module(mode, n_out, n_in, group, dtype)
    x = torch.randn(rows, n_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = qmm.quant_matmul(x, m.qweight, m.scales.contiguous(), m.group_size, fp8=mode == "fp8", num_sms=num_sms)
    assert y.shape == (rows, n_out) and y.dtype == dtype
    want = reference(m, x)
    # fp32: only summation order differs; bf16: the scales are stored in bf16 as the module keeps them, and the
    # interpreter truncates the final cast (a few ulp of ~1-sized outputs)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y.double(), want, **tol)


def test_split_k_sums_partials_and_matches_one_pass():
    m = module("int4", 64, 512, 32, torch.float32)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(2))
    one = qmm.quant_matmul(x, m.qweight, m.scales, 32, num_sms=1)
    split = qmm.quant_matmul(x, m.qweight, m.scales, 32, num_sms=64)  # 16 K tiles of one group -> 16 splits
    torch.testing.assert_close(split, one, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one.double(), reference(m, x), atol=1e-4, rtol=1e-4)


def test_bad_int4_shapes_are_refused():
    m = module("int4", 64, 96, 32, torch.float32)
    with pytest.raises(ValueError, match="groups of 48"):
        qmm.quant_matmul(torch.randn(1, 96), m.qweight, m.scales, 48)
    with pytest.raises(ValueError, match="groups of 96"):  # a multiple of 32 whose K tiles would straddle groups
        qmm.quant_matmul(torch.randn(1, 96), m.qweight, m.scales, 96)
    assert qmm.quant_matmul(torch.randn(0, 96), m.qweight, m.scales, 32).shape == (0, 64)


def test_quantized_linear_offers_the_kernel_on_cuda_tensors(monkeypatch):
    """QuantizedLinear's kernel table on a CUDA module has "triton" (int8, fp8, and int4 in the plain-nibble layout;
    int8 also torch's ``_weight_int8pack_mm``),
    which calls this kernel with the module's own buffers: run here on CPU tensors by making the module's
    device report "cuda" and the op the interpreted copy."""
    from llmaas.engine import quantization
    from llmaas.engine.kernels import ops

    monkeypatch.setattr(ops, "quant_matmul", qmm)
    monkeypatch.setattr(quantization, "device_sms", lambda device: 4)
    for mode, group in (("int8", 0), ("fp8", 0), ("int4", 32)):
        m = module(mode, 64, 128, group, torch.float32, seed=3)
        monkeypatch.setattr(quantization, "_on_gpu", lambda t: True)
        kernels = m.kernels()
        assert set(kernels) == {"dequant", "triton"} | ({"packed"} if mode == "int8" else set())
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(kernels["triton"](x).double(), reference(m, x), atol=1e-4, rtol=1e-4)
        monkeypatch.setattr(quantization, "_on_gpu", lambda t: False)
        assert "triton" not in m.kernels()


def test_quantized_linear_offers_no_kernel_for_the_cpu_int4_layout(monkeypatch):
    from llmaas.engine import quantization

    linear = nn.Linear(128, 128, bias=False)
    m = QuantizedLinear.from_float(linear, "int4", 32, torch.float32)  # packed for torch's CPU kernel
    if not m.block:
        pytest.skip("this CPU's torch has no int4 pack layout")
    monkeypatch.setattr(quantization, "_on_gpu", lambda t: True)
    assert set(m.kernels()) == {"dequant"}
    with pytest.raises(ValueError, match="plain nibbles"):
        m._triton()

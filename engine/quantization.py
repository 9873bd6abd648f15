"""Weight-only quantization: int8 and fp8 per output channel, int4 group-wise, LoRA on top.

Formats (``W`` is a projection's ``[out, in]`` weight, ``x`` its ``[M, in]`` input):

- int8: ``W ~= q * s[:, None]`` with ``q`` int8 in [-127, 127] ``[out, in]`` and one scale per output
  channel, ``s = max|W[n]| / 127`` ``[out]`` (symmetric, as in LLM.int8()'s weight side and
  torch's ``_weight_int8pack_mm``).
- fp8: ``W ~= q * s[:, None]`` with ``q`` float8 e4m3 (``torch.float8_e4m3fn``) and one scale per output
  channel, ``s = max|W[n]| / 448`` (e4m3's largest finite value): the GPU format of Hopper / Ada cards (the CUDA
  GEMM converts the codes in registers); on CPU it runs as dequantize + GEMM, correct but not a speed mode.
- int4: per group of ``g`` input features, ``W ~= (q - 8) * s + z`` with ``q`` in [0, 15] (asymmetric,
  GPTQ/AWQ/llama.cpp Q4_1 style: ``s = (max - min) / 15``, ``z = min + 8 s``), scales and zeros as
  ``[in / g, out, 2]`` (torch's int4 kernels' order). A Q4_1 GGUF block (``q * d + m``) is exactly this
  with ``s = d``, ``z = m + 8 d`` (engine/gguf.py loads those without a float round trip).

Which kernel runs a projection is measured, not assumed (engine start, cached per machine): for each
weight shape and each bucket of ``M`` (decode rows vs prefill chunks) the candidates are torch's packed
CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) with the compute dtype's
activations or with bf16 ones, and dequantize-then-GEMM (dense GEMM at large ``M``, where packed kernels
fall behind AMX/oneDNN). LoRA deltas are added by the caller on top of ``forward``'s output in the
compute dtype, so mixed-adapter batches are unchanged.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .lora import ATTN_MODULES, GROUPS, MLP_MODULES

logger = logging.getLogger(__name__)

MODES = ("none", "int8", "int4", "fp8")
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
GROUP_SIZES = (32, 64, 128, 256)  # int4 group sizes torch's int4 kernels take
M_BUCKETS = (1, 4, 16, 64, 256)  # rows per call: decode batches up to 16, prefill chunks beyond
Kernel = Callable[[torch.Tensor], torch.Tensor]
FUSED = dict(zip(GROUPS, ("qkv_proj", "gate_up_proj")))  # projection group -> the fused module's attribute name


# ---------------------------------------------------------------------------------------------------------------
# Quantize / dequantize (reference math; also the round-trip tests' subject)

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (q [N, K] int8, scales [N] float32)."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-10)  # [N]
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q [N, K] int8, scales [N]) -> [N, K] in ``dtype``."""
    return q.to(dtype) * scales.to(dtype)[:, None]


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (q [N, K] float8 e4m3 codes as their uint8 bits, scales [N] float32). Bits, so that a
    module's ``.to(dtype)`` (which casts every floating-point buffer) leaves them alone."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)  # [N]
    return (w / scales[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w: [N, K] float -> (q [N, K] int32 in [0, 15], scales_zeros [K / g, N, 2] float32)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    groups = w.float().reshape(n, k // group_size, group_size)  # [N, K/g, g]
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # [N, K/g]
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    q = torch.round((groups - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, pack_scales_zeros(scales, lo + 8 * scales)


def pack_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """scales, zeros: [N, K/g] -> [K/g, N, 2] (the int4 kernels' order)."""
    return torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous().float()


def dequantize_int4(q: torch.Tensor, scales_zeros: torch.Tensor, dtype: torch.dtype,
                    inplace: bool = False) -> torch.Tensor:
    """(q [N, K] in [0, 15], scales_zeros [K/g, N, 2]) -> [N, K] in ``dtype``, as ``q * s + (z - 8 s)``.

    The arithmetic runs in float32, in place in ``q`` when ``inplace`` and it is float32: on CPU a broadcast bf16
    multiply took 2x the float32 one plus the final cast (1536 x 576: 385 us in all against 712 us in bf16)."""
    n, k = q.shape
    groups = scales_zeros.shape[0]
    sz = scales_zeros.float()
    s = sz[..., 0].t()[..., None]  # [N, K/g, 1]
    z = (sz[..., 1] - 8 * sz[..., 0]).t()[..., None]  # [N, K/g, 1]
    w = q if inplace and q.dtype == torch.float32 else q.to(torch.float32, copy=True)
    return w.view(n, groups, k // groups).mul_(s).add_(z).view(n, k).to(dtype)


@functools.cache
def cpu_int4_block() -> int:
    """Rows torch's CPU int4 pack interleaves on this CPU (64 with AVX512, 32 with AVX2: byte j of a block holds
    rows j and j + block/2), found by packing a probe; 0 when the layout is none of these (then we store plain
    nibbles and run dequantize + GEMM only)."""
    q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32):
        if torch.equal(_unpack_blocks(packed, 128, 64, block, torch.int32), q):
            return block
    logger.warning("torch's CPU int4 layout is unknown here: int4 runs as dequantize + GEMM")
    return 0


def int4_block_for(q: torch.Tensor, device: torch.device | str | None = None) -> int:
    """The interleave block ``pack_int4`` uses for ``q`` [N, K] that will live on ``device`` (default: ``q``'s):
    torch's CPU kernel layout on CPU when N fills whole blocks, else 0 (two nibbles per byte along K: what the
    CUDA kernel reads)."""
    on_cpu = torch.device(device if device is not None else q.device).type == "cpu"
    block = cpu_int4_block() if on_cpu else 0
    return block if block and q.shape[0] % block == 0 else 0


def pack_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """q [N, K] in [0, 15] -> [N, K/2] uint8: torch's CPU int4 layout when ``block`` (``int4_block_for(q)``;
    ``_weight_int4pack_mm_for_cpu`` reads it directly), else two nibbles per byte along K."""
    if block:
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack_blocks(packed: torch.Tensor, n: int, k: int, block: int, dtype: torch.dtype) -> torch.Tensor:
    # [N/block, K, block/2] bytes: byte j of (row block b, column c) holds row b*block + j in its low nibble
    # and row b*block + block/2 + j in its high one
    half = block // 2
    blocks = packed.view(n // block, k, half)
    out = torch.empty(n // block, block, k, dtype=dtype, device=packed.device)
    out[:, :half].copy_((blocks & 15).transpose(1, 2))
    out[:, half:].copy_((blocks >> 4).transpose(1, 2))
    return out.view(n, k)


def unpack_int4(packed: torch.Tensor, n: int, k: int, block: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The inverse of ``pack_int4``: -> q [N, K] in [0, 15], as ``dtype`` (converted while it is written)."""
    if block:
        return _unpack_blocks(packed, n, k, block, dtype)
    out = torch.empty(n, k // 2, 2, dtype=dtype, device=packed.device)
    out[..., 0].copy_(packed & 15)
    out[..., 1].copy_(packed >> 4)
    return out.view(n, k)


def bucket(rows: int) -> int:
    """Index of the smallest M bucket holding ``rows`` (the last for more). A loop, not ``bisect``: dynamo traces
    it (a decode step compiles into one graph), and there are five buckets."""
    for i, m in enumerate(M_BUCKETS):
        if rows <= m:
            return i
    return len(M_BUCKETS) - 1


def called_modules(model: nn.Module) -> list[QuantizedLinear]:
    """The QuantizedLinear modules the engine calls: fused ones and unfused projections, not the parts of a fused
    module (transformers' own forward calls those, with dequantize + GEMM)."""
    return [m for m in model.modules() if isinstance(m, QuantizedLinear) and not m.in_fused]


def _on_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


@functools.cache
def has_triton() -> bool:
    """Whether triton is installed (CUDA torch builds ship it; without it CUDA modules run dequantize + GEMM)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def device_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (the quantized GEMM splits K until its grid covers them)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


# ---------------------------------------------------------------------------------------------------------------
# The module

class QuantizedLinear(nn.Module):
    """A bias-free ``nn.Linear`` with int8, fp8 or int4 weights; ``forward`` runs the kernel chosen for ``x``'s
    rows.

    Args:
        mode: "int8", "fp8" or "int4".
        qweight: int8 ``[N, K]`` (int8), float8 e4m3 bits as uint8 ``[N, K]`` (fp8), or ``pack_int4``'s nibbles
            (int4).
        scales: ``[N]`` (int8, fp8) or ``[K / g, N, 2]`` scales and zeros (int4); kept in the compute dtype.
        dtype: the compute dtype: inputs arrive and outputs leave in it.
        block: int4: the layout ``qweight`` was packed in (``int4_block_for``; 0 = plain nibbles). Fixed when
            packed: moving the module to another device keeps the bytes as they are.
    """

    def __init__(self, mode: str, in_features: int, out_features: int, qweight: torch.Tensor,
                 scales: torch.Tensor, dtype: torch.dtype, block: int = 0) -> None:
        super().__init__()
        if mode not in ("int8", "int4", "fp8"):
            raise ValueError(f"mode must be int8, int4 or fp8, got {mode!r}")
        if mode == "fp8" and qweight.dtype != torch.uint8:  # float8 codes would be cast by the next .to(dtype)
            raise ValueError(f"fp8 codes are kept as their uint8 bits (quantize_fp8), got {qweight.dtype}")
        self.mode, self.in_features, self.out_features, self.dtype = mode, in_features, out_features, dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.to(dtype))  # cast with the module; kernels get casts per activation
        self.group_size = in_features // scales.shape[0] if mode == "int4" else 0
        self.block = block if mode == "int4" else 0
        self.in_fused = False  # set by fuse(): the engine calls the fused module instead of this one
        self._cast: dict[torch.dtype, torch.Tensor] = {}
        self._plan: tuple[Kernel, ...] | None = None  # one kernel per M bucket, set by calibrate()

    def _apply(self, fn, recurse=True):  # .to(device / dtype): casts of the old scales and the plan are stale
        self._cast.clear()
        self._plan = None
        result = super()._apply(fn, recurse)
        if self.scales.is_floating_point():
            self.dtype = self.scales.dtype
        return result

    @classmethod
    def from_float(cls, linear: nn.Linear, mode: str, group_size: int, dtype: torch.dtype) -> QuantizedLinear:
        w = linear.weight.detach()
        if mode in ("int8", "fp8"):
            q, scales = quantize_int8(w) if mode == "int8" else quantize_fp8(w)
            return cls(mode, linear.in_features, linear.out_features, q, scales, dtype)
        q, scales_zeros = quantize_int4(w, group_size)
        block = int4_block_for(q)
        return cls(mode, linear.in_features, linear.out_features, pack_int4(q, block), scales_zeros, dtype, block)

    @property
    def shape_key(self) -> str:
        return f"{self.mode}:{self.out_features}x{self.in_features}:g{self.group_size}"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this module multiplies by, ``[N, K]`` in ``dtype`` (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if self.mode == "int8":
            return dequantize_int8(self.qweight, self.scales, dtype)
        if self.mode == "fp8":  # the codes convert exactly to any compute dtype
            return dequantize_int8(self.qweight.view(FP8), self.scales, dtype)
        q = unpack_int4(self.qweight, self.out_features, self.in_features, self.block, torch.float32)
        return dequantize_int4(q, self.scales, dtype, inplace=True)

    def _scales_in(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._cast:
            self._cast[dtype] = self.scales.to(dtype).contiguous()
        return self._cast[dtype]

    def kernels(self) -> dict[str, Kernel]:
        """Every kernel that can run this module here, by name; each maps x [M, K] -> [M, N] (compute dtype).
        "dequant" (dequantize + GEMM in the compute dtype) is the reference; on CPU the others run the GEMM with
        bf16 activations too (AMX / AVX512-BF16 make that the fast GEMM on some CPUs, not on others); on CUDA the
        Triton w8a16 / w4a16 GEMM (``engine/kernels/quant_matmul.py``) and, int8, torch's ``_weight_int8pack_mm``."""
        out: dict[str, Kernel] = {"dequant": lambda x: F.linear(x, self.dequantize())}
        if _on_gpu(self.qweight):
            if has_triton() and self.block == 0:  # it reads int4 as plain nibbles only
                out["triton"] = self._triton()
            if self.mode == "int8":  # torch's CUDA kernel, where the build has one (else calibration drops it)
                out["packed"] = self._packed(self.dtype)
            return out
        if self.qweight.device.type != "cpu":
            return out
        for act in dict.fromkeys((self.dtype, torch.bfloat16)):
            name = str(act).removeprefix("torch.")
            if act != self.dtype:
                out[f"dequant-{name}"] = self._dequant_in(act)
            if (self.mode == "int8" or self.block > 0) and act in (torch.float32, torch.bfloat16, torch.float16):
                out[f"packed-{name}"] = self._packed(act)
        return out

    def _dequant_in(self, act: torch.dtype) -> Kernel:
        def run(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x.to(act), self.dequantize(act)).to(self.dtype)
        return run

    def _packed(self, act: torch.dtype) -> Kernel:
        if self.mode == "int8":
            def run(x: torch.Tensor) -> torch.Tensor:
                # contiguous: torch's CUDA kernel indexes x as dense rows
                return torch._weight_int8pack_mm(x.to(act).contiguous(), self.qweight,
                                                 self._scales_in(act)).to(self.dtype)
        else:
            def run(x: torch.Tensor) -> torch.Tensor:
                return torch._weight_int4pack_mm_for_cpu(x.to(act), self.qweight, self.group_size,
                                                         self._scales_in(act)).to(self.dtype)
        return run

    def _triton(self) -> Kernel:
        from .kernels.ops import kernel_ops  # imports triton: CUDA modules only

        if self.mode == "int4" and self.block:
            raise ValueError(f"the Triton GEMM reads int4 as plain nibbles; {self.shape_key} is in torch's CPU layout")
        ops, sms = kernel_ops(), device_sms(self.qweight.device)
        scales = self._scales_in(self.dtype)  # now, not in the call: a traced step must not see the cache change
        fp8 = self.mode == "fp8"

        def run(x: torch.Tensor) -> torch.Tensor:
            return ops.quant_matmul(x.contiguous(), self.qweight, scales, self.group_size, fp8, sms)
        return run

    def use(self, plan: tuple[Kernel, ...]) -> None:
        self._plan = plan

    @property
    def planned(self) -> bool:
        """Whether calibration gave it its kernels (else ``forward`` runs dequantize + GEMM)."""
        return self._plan is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] (or [..., K]) -> [M, N] in the compute dtype."""
        if x.dim() == 2 and self._plan is not None:  # the engine's flat tokens: no reshapes (ops per decode step)
            return self._plan[bucket(x.shape[0])](x)
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self._plan is None:
            y = F.linear(x, self.dequantize())
        else:
            y = self._plan[bucket(x.shape[0])](x)
        return y.reshape(*lead, self.out_features)


def fuse(parts: list[QuantizedLinear]) -> QuantizedLinear | None:
    """One module computing ``cat([p(x) for p in parts], -1)`` (q/k/v, gate/up: one kernel call instead of three
    or two; on a 135M model the calls, not the bytes, are most of a decode step). The parts keep working on
    views of its weight, so nothing is stored twice. None when the parts' formats differ."""
    first = parts[0]
    if any((p.mode, p.in_features, p.group_size, p.block, p.dtype, p.qweight.device) !=
           (first.mode, first.in_features, first.group_size, first.block, first.dtype, first.qweight.device)
           for p in parts):
        return None
    # Both int4 layouts are whole rows (the CPU one in blocks of 64, which every part's N is a multiple of):
    # concatenating rows concatenates outputs.
    qweight = torch.cat([p.qweight for p in parts])
    scales = torch.cat([p.scales for p in parts], dim=1 if first.mode == "int4" else 0)
    fused = QuantizedLinear(first.mode, first.in_features, sum(p.out_features for p in parts), qweight, scales,
                            first.dtype, first.block)
    start = 0
    for p in parts:
        rows = p.qweight.shape[0]
        p.qweight = fused.qweight[start:start + rows]
        p.in_fused = True
        start += rows
    return fused


# ---------------------------------------------------------------------------------------------------------------
# Whole models

def quantize_model(hf_model: nn.Module, mode: str, group_size: int, dtype: torch.dtype,
                   prequantized: dict[str, QuantizedLinear] | None = None) -> int:
    """Replaces every decoder projection (q/k/v/o, gate/up/down) and the LM head of a Llama-family model by
    QuantizedLinear, in place, then fuses q/k/v and gate/up; ``prequantized`` (module path -> module, e.g. from
    a GGUF file's blocks) wins over quantizing the float weight. The LM head is int8 in every mode (llama.cpp
    keeps it at 8 bits too; an fp8 head cost the default model +5.5% perplexity against +2.6% with an int8
    one). Returns the bytes the quantized weights hold."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {MODES}, got {mode!r}")
    if mode == "none":
        return 0
    device = hf_model.lm_head.weight.device
    if mode == "fp8" and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        logger.warning("fp8 weights run as dequantize + GEMM on %s (the fp8 GEMM needs a GPU of compute capability "
                       "8.9+): correct, but slower than int8, which also keeps more quality", device)
    prequantized = prequantized or {}
    targets = [(f"model.layers.{i}.{part}.{name}", getattr(getattr(layer, part), name))
               for i, layer in enumerate(hf_model.model.layers)
               for part, names in (("self_attn", ATTN_MODULES), ("mlp", MLP_MODULES)) for name in names]
    targets.append(("lm_head", hf_model.lm_head))
    if biased := [path for path, linear in targets if linear.bias is not None]:
        raise ValueError(f"quantization needs bias-free projections (Llama, Mistral); {biased[0]} has a bias")
    for path, linear in targets:
        quantized = prequantized.get(path)
        if quantized is None:
            quantized = QuantizedLinear.from_float(linear, "int8" if path == "lm_head" else mode, group_size, dtype)
        parent_path, _, attr = path.rpartition(".")
        parent = hf_model.get_submodule(parent_path) if parent_path else hf_model
        setattr(parent, attr, quantized.to(linear.weight.device))
    for layer in hf_model.model.layers:
        for owner, names in ((layer.self_attn, GROUPS[0]), (layer.mlp, GROUPS[1])):
            fused = fuse([getattr(owner, n) for n in names])
            if fused is not None:  # a submodule, so .to() and calibrate() reach it; CausalLM calls it
                setattr(owner, FUSED[names], fused)
    return quantized_bytes(hf_model)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes the QuantizedLinear modules' weights hold (shared storage, as fused parts' views, once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for m in model.modules() if isinstance(m, QuantizedLinear) for t in (m.qweight, m.scales)}
    return sum(storages.values())

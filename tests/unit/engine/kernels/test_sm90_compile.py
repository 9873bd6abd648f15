"""Every kernel, as its wrapper launches it for Llama-3.2-1B and Llama-3.1-8B shapes in bf16, compiled for
sm_90 (H100/H200) on this CPU box: it must compile, spill nothing to local memory and fit in shared memory.
Registers and shared memory are printed (``pytest -s``) for the issue notes.

The wrappers run on ``meta`` tensors with the launch recorded instead of run, so what is compiled is exactly
the signature and constexprs the wrapper would launch with.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="the Triton kernels need triton (test extras)")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from llmaas.engine.kernels import layers, paged_attention, quant_matmul, sampling, sgmv  # noqa: E402

RUNS_IN_INTERPRETER = False  # compiled, not interpreted: no interpreter patches (conftest.py)
H100 = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # per block on sm_90
LAUNCH_OPTIONS = ("num_warps", "num_stages")  # launch keywords that are compile options, not constexprs
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
         torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8"}
SHAPES = {  # (hidden, heads, kv_heads, head_dim, intermediate)
    "llama-3.2-1b": (2048, 32, 8, 64, 8192),
    "llama-3.1-8b": (4096, 32, 8, 128, 14336),
}
VOCAB = 128256  # both models'


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs)`` is recorded, not run."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((args, constexprs))


def signature(kernel, args, constexprs) -> dict[str, str]:
    sig = {}
    for name, arg in zip(kernel.arg_names, args):
        if isinstance(arg, torch.Tensor):
            sig[name] = "*" + TYPES[arg.dtype]
        elif isinstance(arg, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -2 ** 31 <= arg < 2 ** 31 else "i64"
    return sig | {name: "constexpr" for name in constexprs}


def resources(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text)}


def launches(model: str):
    """(name, module, kernel name, wrapper call) for every kernel launch of one layer's decode/prefill step."""
    hidden, heads, kv_heads, head_dim, inter = SHAPES[model]
    meta = dict(device="meta", dtype=torch.bfloat16)
    i32 = dict(device="meta", dtype=torch.int32)
    batch, tokens, slots, blocks, rank, num_slots = 256, 512, 4096 * 16, 64, 16, 8
    k_cache = torch.empty(slots, kv_heads, head_dim, **meta)
    tables, seq_lens = torch.empty(batch, blocks, **i32), torch.empty(batch, **i32)
    qkv = torch.empty(tokens, (heads + 2 * kv_heads) * head_dim, **meta)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    plan = sgmv.TokenPlan(order=torch.empty(tokens, **i32), starts=torch.empty(num_slots, **i32),
                          counts=torch.empty(num_slots, **i32), num_slots=num_slots)
    ax = torch.empty(tokens, 3 * rank, **meta)
    yield "decode", paged_attention, "_decode_split_kernel", lambda: paged_attention.paged_decode_attention(
        torch.empty(batch, heads, head_dim, **meta), k_cache, k_cache, tables, seq_lens, 0.1, 16)
    yield "decode split-K", paged_attention, "_decode_split_kernel", lambda: paged_attention.paged_decode_attention(
        torch.empty(2, heads, head_dim, **meta), k_cache, k_cache, tables[:2], seq_lens[:2], 0.1, 16, num_splits=8)
    yield "merge splits", paged_attention, "_merge_splits_kernel", lambda: paged_attention.paged_decode_attention(
        torch.empty(2, heads, head_dim, **meta), k_cache, k_cache, tables[:2], seq_lens[:2], 0.1, 16, num_splits=8)
    yield "prefill", paged_attention, "_prefill_kernel", lambda: paged_attention.paged_prefill_attention(
        torch.empty(tokens, heads, head_dim, **meta), k_cache, k_cache, tables[:4], torch.empty(5, **i32),
        seq_lens[:4], 512, 0.1, 16)
    yield "add+rmsnorm", layers, "_add_rmsnorm_kernel", lambda: layers.add_rmsnorm(
        torch.empty(tokens, hidden, **meta), torch.empty(hidden, **meta), 1e-5, torch.empty(tokens, hidden, **meta))
    yield "rope", layers, "_rope_kernel", lambda: layers.rope_(
        q, k, torch.empty(4096, head_dim, **meta), torch.empty(4096, head_dim, **meta),
        torch.empty(tokens, device="meta", dtype=torch.int64))
    yield "rope + cache write", layers, "_rope_kernel", lambda: layers.rope_and_cache_(
        q, k, k, torch.empty(4096, head_dim, **meta), torch.empty(4096, head_dim, **meta),
        torch.empty(tokens, device="meta", dtype=torch.int64), k_cache, k_cache,
        torch.empty(tokens, device="meta", dtype=torch.int64))
    yield "rope + cache write (graph)", layers, "_rope_kernel", lambda: layers.rope_and_cache_(
        q, k, k, torch.empty(4096, head_dim, **meta), torch.empty(4096, head_dim, **meta),
        torch.empty(tokens, **i32), k_cache, k_cache, torch.empty(tokens, **i32))  # the graphs' int32 buffers
    yield "silu*up", layers, "_silu_mul_kernel", lambda: layers.silu_mul(torch.empty(tokens, 2 * inter, **meta))
    yield "lora shrink", sgmv, "_shrink_kernel", lambda: sgmv.lora_shrink(
        torch.empty(tokens, hidden, **meta), torch.empty(num_slots, 3 * rank, hidden, **meta), plan)
    yield "lora expand", sgmv, "_expand_kernel", lambda: sgmv.lora_expand_(
        qkv, ax, torch.empty(num_slots, heads * head_dim, rank, **meta), torch.empty(num_slots, device="meta"), plan)
    for mode, group in (("w8a16", 0), ("fp8 w8a16", 0), ("w4a16", 128)):  # int4 groups as QuantizedLinear's
        w = torch.empty(inter, hidden // 2 if group else hidden, device="meta",
                        dtype=torch.int8 if mode == "w8a16" else torch.uint8)  # gate_proj-sized; fp8 as its bits
        fp8 = mode.startswith("fp8")
        scales = torch.empty(*((hidden // group, inter, 2) if group else (inter,)), **meta)
        for phase, rows in (("decode", 8), ("prefill", tokens)):
            yield f"{mode} {phase}", quant_matmul, "_quant_matmul_kernel", (
                lambda w=w, s=scales, g=group, r=rows, f=fp8:
                quant_matmul.quant_matmul(torch.empty(r, hidden, **meta), w, s, g, fp8=f, num_sms=132))
        # o_proj-sized decode: hidden / 64 output tiles on 132 SMs, so K is split (float32 partials)
        o_w = torch.empty(hidden, w.shape[1], device="meta", dtype=w.dtype)
        o_scales = torch.empty(*((hidden // group, hidden, 2) if group else (hidden,)), **meta)
        yield f"{mode} decode split-K", quant_matmul, "_quant_matmul_kernel", (
            lambda w=o_w, s=o_scales, g=group, f=fp8:
            quant_matmul.quant_matmul(torch.empty(8, hidden, **meta), w, s, g, fp8=f, num_sms=132))
    yield "sampling", sampling, "_sample_kernel", lambda: sampling.sample_rows(
        torch.empty(batch, VOCAB, device="meta"), torch.empty(len(sampling.PARAMS), batch, **i32),
        count_steps=True)  # as the engine's device sampler launches it


CASES = [(model, name) for model in SHAPES for name, *_ in launches(model)]


@pytest.mark.parametrize(("model", "name"), CASES, ids=[f"{m}-{n}" for m, n in CASES])
def test_kernel_compiles_for_sm90_without_spills(model, name, monkeypatch):
    module, kernel_name, call = next((mod, k, c) for n, mod, k, c in launches(model) if n == name)
    recorder = Recorder(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, recorder)
    for other in ("_decode_split_kernel", "_merge_splits_kernel"):  # the split-K wrapper launches both
        if other != kernel_name and hasattr(module, other):
            monkeypatch.setattr(module, other, Recorder(getattr(module, other)))
    call()
    (args, constexprs), = recorder.launches
    options = {key: constexprs.pop(key) for key in LAUNCH_OPTIONS if key in constexprs}
    kernel = recorder.kernel
    compiled = triton.compile(ASTSource(kernel, signature(kernel, args, constexprs), constexprs=constexprs),
                              target=H100, options=options)
    used = resources(compiled.asm["cubin"])
    print(f"\n{model} {name}: {used['REG']} registers, {compiled.metadata.shared} B shared, "
          f"{used['LOCAL']} B local, {compiled.metadata.num_warps} warps")
    assert used["LOCAL"] == 0, f"{name} spills {used['LOCAL']} bytes to local memory"
    assert compiled.metadata.shared <= MAX_SHARED


def test_compile_test_covers_every_kernel():
    kernels = {(mod.__name__, k) for model in SHAPES for _, mod, k, _ in launches(model)}
    defined = {(mod.__name__, name) for mod in (layers, paged_attention, quant_matmul, sampling, sgmv)
               for name, obj in vars(mod).items()
               if isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")}
    assert defined == kernels



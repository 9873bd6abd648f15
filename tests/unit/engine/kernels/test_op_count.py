"""Ops per decoder layer of a Llama-3.2-1B decode step (256 sequences), counted on meta tensors by
``benchmarks/op_count.py``: the CUDA path must stay within 12 with LoRA off (issue 16), and each adapter
projection adds a shrink and an expand at most, where the CPU path adds ~6 small ops."""
from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="the CUDA path needs triton (test extras)")
from llmaas.benchmarks.op_count import ops_per_layer  # noqa: E402

RUNS_IN_INTERPRETER = False  # on meta tensors the kernels' custom ops run their fake (shape-only) versions


def test_cuda_path_decode_layer_runs_at_most_12_ops():
    cuda, by_name = ops_per_layer("triton", num_seqs=256, context=256, loras=0)
    cpu, _ = ops_per_layer("torch", num_seqs=256, context=256, loras=0)
    assert cuda <= 12, by_name
    assert by_name["linear"] == 4  # one QKV and one gate_up GEMM: the fused weights
    assert cpu >= 2 * cuda  # 24 vs 9 (bf16, 2026-12-02)


def test_lora_adds_one_shrink_per_input_and_one_expand_per_projection():
    base, _ = ops_per_layer("triton", num_seqs=256, context=256, loras=0)
    with_lora, by_name = ops_per_layer("triton", num_seqs=256, context=256, loras=8)
    assert by_name["lora_shrink"] == 4  # x (q/k/v stacked), attention output, x (gate/up), act
    assert by_name["lora_expand"] == 7
    assert with_lora - base == 4 + 7  # and nothing else per layer

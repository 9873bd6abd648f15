"""The CUDA path's decode step, as a CUDA graph captures it (engine/cuda_graphs.py), traced by dynamo over 20
steps of growing context: one graph, no breaks (``fullgraph=True``), no recompiles, with a float base and with
an int4 one whose projections run the quantized GEMM op. The kernels are custom ops
(opaque to dynamo) running in Triton's interpreter; ``backend="eager"`` runs the traced graph as is."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from llmaas.engine import cuda_graphs

from .tiny_engine import make_engine, run_quantized_with

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


@pytest.mark.parametrize("quantization", ["none", "int4"])
@pytest.mark.usefixtures("cuda_quantized_layout")
def test_decode_step_compiles_once_over_20_steps_of_growing_context(tiny_base_dir, quantization):
    engine = make_engine(tiny_base_dir, "triton", quantization=quantization, quant_group_size=32)
    if quantization != "none":  # every projection through the quantized GEMM op
        run_quantized_with(engine, "triton")
    graphs = cuda_graphs.DecodeGraphs(engine.model, engine.runner.kv_cache, engine.runner.lora_pool, max_num_seqs=3,
                                      max_blocks=8, capture=lambda step: (None, None))
    counter = CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(graphs._step(4), backend=counter, fullgraph=True)
    eager = graphs._step(4)
    blocks = [[0, 1], [2, 3, 4], [5, 6]]
    with torch.inference_mode():
        # contexts 10..29, 20..39, 0..19: each table grows by a block on the way (int4: 8 steps, the first
        # table's growth; the interpreted GEMMs are slow)
        for i in range(20 if quantization == "none" else 8):
            positions = [10 + i, 20 + i, i]
            tables = [own[:p // 16 + 1] for own, p in zip(blocks, positions)]
            graphs.prepare([7, 8, 9], positions, tables, [0, None, 1], block_size=16)
            out = step()[:3]
            torch.testing.assert_close(out, eager()[:3])
    assert counter.frame_count == 1, f"{counter.frame_count} compiles"
    assert counter.op_count > 0

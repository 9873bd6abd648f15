"""The CUDA path's decode step, as a CUDA graph captures it (engine/cuda_graphs.py), traced by dynamo over 6
steps of growing context (every block table grows by a block on the way): one graph, no breaks
(``fullgraph=True``), no recompiles, with a float base and with an int4 one whose projections run the quantized
GEMM op. The kernels are custom ops (opaque to dynamo) running in Triton's interpreter; ``backend="eager"``
runs the traced graph as is."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from llmaas.engine import cuda_graphs

from .tiny_engine import make_engine, run_quantized_with

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


@pytest.mark.parametrize("quantization", ["none", "int4"])
@pytest.mark.usefixtures("cuda_quantized_layout")
def test_decode_step_compiles_once_while_every_block_table_grows(tiny_base_dir, quantization):
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
        # contexts 14..19, 29..34, 13..18: each table grows by a block on the way (at positions 16, 32, 16), in
        # 6 steps (the interpreted kernels are slow: 20 steps took 46 s on 2 cores)
        for i in range(6):
            positions = [14 + i, 29 + i, 13 + i]
            tables = [own[:p // 16 + 1] for own, p in zip(blocks, positions)]
            graphs.prepare([7, 8, 9], positions, tables, [0, None, 1], block_size=16)
            out = step()[:3]
            torch.testing.assert_close(out, eager()[:3])
    assert counter.frame_count == 1, f"{counter.frame_count} compiles"
    assert counter.op_count > 0

"""Decode steps through captured graphs (engine/cuda_graphs.py), on CPU: ``EagerReplay`` stands in for a CUDA
graph (the captured step re-run over the same static input buffers, its output written into the tensor
captured), with the kernels in Triton's interpreter. What is checked is ours: buckets, the one persistent input
buffer and its padding rows, the static outputs, and that tokens equal the eager path's, adapters included."""
from __future__ import annotations

import pytest
import torch

from llmaas.engine import SamplingParams, cuda_graphs
from llmaas.engine.kernels.layers import PAD_SLOT_ID
from tests.models import make_peft_adapter

from .tiny_engine import make_engine, random_prompts

pytestmark = pytest.mark.usefixtures("interpreted_kernels")


@pytest.mark.parametrize(("max_num_seqs", "want"), [
    (1, [1]), (3, [1, 2, 3]), (20, [1, 2, 4, 8, 16, 20]), (64, [1, 2, 4, 8, 16, 32, 48, 64]),
])
def test_buckets_end_at_max_num_seqs(max_num_seqs, want):
    assert cuda_graphs.batch_buckets(max_num_seqs) == want


def test_decode_steps_replay_graphs_with_adapters_and_match_the_eager_path(tiny_base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32)
    # distinct scales (alpha / r = 2 and, with rsLoRA, alpha / sqrt(r) ~ 5.7): a slot given the other's scale
    # in the graphs' scales buffer changes tokens
    paths = [make_peft_adapter(base, tmp_path / "a0", seed=20),
             make_peft_adapter(base, tmp_path / "a1", seed=21, use_rslora=True)]
    prompts = random_prompts((4, 21, 9), seed=3)  # 3 sequences decode in the 4-row bucket: one padding row
    loras = ["a1", None, "a0"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    results = {}
    for graphs in (False, True):
        engine = make_engine(tiny_base_dir, "triton", cuda_graphs=graphs)
        for i, path in enumerate(paths):
            engine.add_lora(f"a{i}", path)
        results[graphs] = engine.generate(prompts, params, loras)
    assert results[True] == results[False]
    graphs = engine.runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4] and isinstance(graphs.graphs[4], cuda_graphs.EagerReplay)
    assert graphs.num_replays == sum(g.replays for g in graphs.graphs.values()) >= 4  # the decode-only steps
    assert graphs.graphs[4].replays >= 3  # three sequences, one padding row
    assert make_engine(tiny_base_dir, "triton").runner.graphs is None  # CPU: no graphs unless asked


def test_padding_rows_write_no_cache_and_inputs_stay_in_one_buffer(tiny_base_dir):
    engine = make_engine(tiny_base_dir, "triton", cuda_graphs=True)
    graphs = engine.runner.graphs
    static = graphs.static.data_ptr()
    cache_k, cache_v = engine.runner.kv_cache.k.clone(), engine.runner.kv_cache.v.clone()
    tables = [[3], [5, 6], [7]]
    positions = [2, 20, 0]
    with torch.inference_mode():  # as the model runner runs it
        out = graphs.run([11, 12, 13], positions, tables, [None, 1, None], block_size=16)
    assert out.shape[0] == 3 and out.data_ptr() == graphs.outputs[4].data_ptr()  # a view of the static output
    assert graphs.static.data_ptr() == static
    views = graphs._static_views
    assert views["slots"][:4].tolist() == [3 * 16 + 2, 6 * 16 + 4, 7 * 16, PAD_SLOT_ID]
    assert views["seq_lens"][:4].tolist() == [3, 21, 1, 1] and views["lora"][:4].tolist() == [-1, 1, -1, -1]
    changed = (engine.runner.kv_cache.k != cache_k).any(-1).any(-1) | (engine.runner.kv_cache.v != cache_v).any(
        -1).any(-1)  # [layers, slots]
    assert sorted(changed.nonzero()[:, 1].unique().tolist()) == [3 * 16 + 2, 6 * 16 + 4, 7 * 16]
    with pytest.raises(ValueError, match="no decode graph"):
        graphs.run([1] * 5, [0] * 5, [[0]] * 5, [None] * 5, block_size=16)


def test_a_quantized_engine_captures_its_graphs_after_calibration(tiny_base_dir, monkeypatch):
    """A graph replays the kernels it recorded: the engine captures once every quantized projection has its
    calibrated kernels, and capturing before that is refused."""
    from llmaas.engine.model_runner import ModelRunner
    from llmaas.engine.quantization import QuantizedLinear

    seen = []
    capture = ModelRunner.capture_graphs

    def spy(self):
        seen.append(all(m.planned for m in self.model.hf_model.modules()
                        if isinstance(m, QuantizedLinear) and not m.in_fused))
        capture(self)

    monkeypatch.setattr(ModelRunner, "capture_graphs", spy)
    engine = make_engine(tiny_base_dir, "triton", cuda_graphs=True, quantization="int8")
    assert seen == [True] and engine.runner.graphs is not None
    runner = engine.runner
    runner.graphs = None
    runner.model.hf_model.lm_head.use(None)  # as if calibration had not run
    with pytest.raises(RuntimeError, match="calibrate first"):
        capture(runner)

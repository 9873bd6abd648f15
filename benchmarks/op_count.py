"""Ops per decoder layer of one decode step, and host time to prepare that step: the CPU path (torch ops over
fused weights, gathered attention) against the CUDA path (fused weights, Triton kernels).

    python -m benchmarks.op_count                          # Llama-3.2-1B shape, 256 sequences of 256 tokens
    python -m benchmarks.op_count --loras 8                # with every sequence on one of 8 adapters

A GPU step is launch-bound when it issues many small ops, so the count is what the CUDA path is judged by here
(no GPU needed): the model runs on ``meta`` tensors (shapes only, no weights, nothing computed) and every op
that is not a view or an allocation is counted by a ``TorchDispatchMode``: aten ops, and the Triton kernels'
custom ops (``torch.ops.llmaas.*``, one launch each; a split-K decode attention, two). Ops per layer = ops of an
L-layer model - ops of an (L-1)-layer model.
Host time: the step's inputs built from the scheduler's Python lists, median over consecutive decode steps (the
CPU path: attention metadata + input tensors; the CUDA path: its CUDA graphs' one input buffer, copied to the
device in one go).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM

from llmaas.benchmarks.common import machine, print_table, save
from llmaas.engine.attention import KVCache
from llmaas.engine.lora import LoRABatch, LoRAPool
from llmaas.engine.model import build_model

LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=True,
                    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                      original_max_position_embeddings=8192))
NOT_COUNTED = ("empty", "new_empty", "empty_like", "empty_strided", "detach", "lift_fresh")  # no device work
BLOCK_SIZE = 16
RANK = 16  # adapters' rank (the slots' max_rank)


class OpCounter(TorchDispatchMode):
    """Counts aten ops that do device work (views and allocations are free)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_COUNTED:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def decode_step(num_layers: int, backend: str, num_seqs: int, context: int, loras: int
                ) -> tuple[Counter[str], object, list[list[int]]]:
    """Ops of one decode step of ``num_seqs`` sequences with ``context`` tokens cached, on meta tensors."""
    cfg = LlamaConfig(**(LLAMA_3_2_1B | dict(num_hidden_layers=num_layers)))
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model = build_model(hf, context + 64, backend, BLOCK_SIZE)
    blocks = -(-(context + 1) // BLOCK_SIZE)
    tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(num_seqs)]
    kv = KVCache(num_layers, num_seqs * blocks * BLOCK_SIZE, model.num_kv_heads, model.head_dim, torch.bfloat16,
                 "meta", model.head_major_cache)
    pool = LoRAPool(loras, RANK, num_layers, model.projection_shapes(), torch.bfloat16, "meta") if loras else None
    per = -(-num_seqs // loras) if loras else 0
    segments = [(s, min(s + per, num_seqs), i) for i, s in enumerate(range(0, num_seqs, per))] if loras else []
    counter = OpCounter()
    with counter:
        meta = model.build_metadata([context] * num_seqs, [1] * num_seqs, tables, BLOCK_SIZE, "meta")
        lora = model.prepare_lora(LoRABatch(segments), pool, num_seqs, "meta")
        before = Counter(counter.ops)  # metadata: host work, not counted as the forward's
        ids = torch.zeros(num_seqs, dtype=torch.long, device="meta")
        model(ids, torch.full((num_seqs,), context, device="meta"), meta, kv, lora, pool)
    return counter.ops - before, model, tables


def ops_per_layer(backend: str, num_seqs: int, context: int, loras: int) -> tuple[int, Counter[str]]:
    """(ops per decoder layer, that layer's ops by name) = an L-layer step's ops - an (L-1)-layer step's."""
    layers = LLAMA_3_2_1B["num_hidden_layers"]
    full, _, _ = decode_step(layers, backend, num_seqs, context, loras)
    less, _, _ = decode_step(layers - 1, backend, num_seqs, context, loras)
    diff = full - less
    return sum(diff.values()), diff


def host_prepare_ms(backend: str, num_seqs: int, context: int, steps: int = 32) -> float:
    """Median wall time of turning the scheduler's lists into one decode step's inputs, on the host, over
    ``steps`` consecutive steps (contexts staggered so that, as in a real batch, a sixteenth of the sequences
    take a new block each step): the CPU path's metadata and input tensors; the CUDA path's CUDA-graph input
    buffer (``DecodeGraphs.prepare``)."""
    cfg = LlamaConfig(**(LLAMA_3_2_1B | dict(num_hidden_layers=1)))
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg).eval()
    model = build_model(hf, context + steps + 64, backend, BLOCK_SIZE)
    width = -(-(context + steps + BLOCK_SIZE) // BLOCK_SIZE)
    owned = [list(range(i * width, (i + 1) * width)) for i in range(num_seqs)]  # each sequence's blocks
    ids, loras = [1] * num_seqs, [None] * num_seqs
    if backend == "triton":
        from llmaas.engine.cuda_graphs import DecodeGraphs  # the CUDA path's only: imports triton

        kv = KVCache(1, 16, model.num_kv_heads, model.head_dim, torch.float32, "meta")
        graphs = DecodeGraphs(model, kv, None, num_seqs, width, capture=lambda step: (None, None))

        def prepare(positions: list[int], tables: list[list[int]]) -> None:
            graphs.prepare(ids, positions, tables, loras, BLOCK_SIZE)
    else:
        def prepare(positions: list[int], tables: list[list[int]]) -> None:
            model.build_metadata(positions, [1] * num_seqs, tables, BLOCK_SIZE, "cpu")
            torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
    times = []
    tables = [[] for _ in range(num_seqs)]
    for step in range(steps + 1):
        positions = [context + i % BLOCK_SIZE + step for i in range(num_seqs)]
        for table, own, pos in zip(tables, owned, positions):  # the block manager appends a block when one fills
            while len(table) <= pos // BLOCK_SIZE:
                table.append(own[len(table)])
        start = time.perf_counter()
        prepare(positions, tables)
        if step:  # step 0 fills every row: a warm-up
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, default=256, help="sequences in the decode step")
    p.add_argument("--context", type=int, default=256, help="tokens each sequence has cached")
    p.add_argument("--loras", type=int, default=0, help="adapters the sequences are spread over (0: none)")
    args = p.parse_args()
    rows = []
    for backend, path in (("torch", "CPU path (torch ops, gathered attention)"),
                          ("triton", "CUDA path (fused weights, Triton kernels)")):
        count, by_name = ops_per_layer(backend, args.seqs, args.context, args.loras)
        rows.append({"path": path, "backend": backend, "ops_per_layer": count,
                     "host_prepare_ms": host_prepare_ms(backend, args.seqs, args.context),
                     "ops": dict(sorted(by_name.items()))})
    print_table(rows, ["path", "ops_per_layer", "host_prepare_ms"])
    for row in rows:
        print(f"{row['backend']}: " + ", ".join(f"{k} x{v}" for k, v in row["ops"].items()))
    print(f"Llama-3.2-1B shape, {args.seqs} sequences x {args.context} cached tokens, {args.loras} adapters; "
          f"host time on {machine()}")
    save("op_count" + (f"_{args.loras}adapters" if args.loras else ""),
         {"seqs": args.seqs, "context": args.context, "loras": args.loras, "rows": rows})


if __name__ == "__main__":
    main()

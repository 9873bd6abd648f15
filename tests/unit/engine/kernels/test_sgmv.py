"""Multi-LoRA shrink/expand by per-token adapter index against a per-row reference and against the engine's
own LoRAPool, in the interpreter: tokens in any order, rows without an adapter, padded ranks, fused outputs."""
from __future__ import annotations

import pytest
import torch

from llmaas.engine.lora import GROUPS, AdapterWeights, LoRABatch, LoRAPool

from .interpreter import interpreted

sgmv = interpreted("sgmv")
NO = sgmv.NO_ADAPTER
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def test_plan_groups_rows_by_slot():
    plan = sgmv.plan_tokens(torch.tensor([2, NO, 0, 2, NO, 2]), num_slots=4)
    assert plan.counts.tolist() == [1, 0, 3, 0]
    assert plan.starts.tolist() == [2, 3, 3, 6]
    assert plan.order.tolist() == [1, 4, 2, 0, 3, 5]  # stable: rows of a slot keep their order


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shrink_then_expand_into_fused_columns_matches_per_row_reference(dtype):
    g = torch.Generator().manual_seed(0)
    num_slots, rank, n_in, outs = 3, 8, 48, (40, 24)  # two modules sharing x, stacked A, fused output
    slots = torch.tensor([1, NO, 0, 1, 1, NO, 2, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1])  # > one 16-row tile of slot 1
    x = torch.randn(len(slots), n_in, generator=g).to(dtype)
    # unit-scale A x and B (A x), so bf16's one-ulp errors (truncated in the interpreter) stay ~0.01
    a = (torch.randn(num_slots, len(outs) * rank, n_in, generator=g) / n_in ** 0.5).to(dtype)
    bs = [(torch.randn(num_slots, o, rank, generator=g) / rank ** 0.5).to(dtype) for o in outs]
    scales = torch.tensor([0.5, 2.0, 1.0])
    y = torch.randn(len(slots), sum(outs), generator=g).to(dtype)
    want = y.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s == NO:
            continue
        ax = x[t].double() @ a[s].double().T
        col = 0
        for i, (o, b) in enumerate(zip(outs, bs)):
            want[t, col:col + o] += scales[s].item() * ax[i * rank:(i + 1) * rank] @ b[s].double().T
            col += o
    plan = sgmv.plan_tokens(slots, num_slots)
    ax = sgmv.lora_shrink(x, a, plan)
    col = 0
    for i, (o, b) in enumerate(zip(outs, bs)):
        sgmv.lora_expand_(y, ax, b, scales, plan, r0=i * rank, col0=col)
        col += o
    torch.testing.assert_close(y.double(), want, **TOL[dtype])


def test_kernels_read_the_engine_lora_pool_and_agree_with_it():
    """The CUDA path's kernels over LoRAPool's own buffers give what the CPU path's pool.apply_group gives."""
    g = torch.Generator().manual_seed(1)
    hidden, kv, max_rank = 32, 16, 8
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv)}
    pool = LoRAPool(num_slots=3, max_rank=max_rank, num_layers=1, shapes=shapes, dtype=torch.float32, device="cpu")
    for slot, rank in [(0, 4), (2, 8)]:  # rank 4 is zero-padded to max_rank in the pool
        weights = {(0, m): (torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g))
                   for m, (i, o) in shapes.items()}
        pool.write(slot, AdapterWeights(name=f"a{slot}", rank=rank, scale=16 / rank, weights=weights))
    x = torch.randn(6, hidden, generator=g)
    outs = [torch.randn(6, shapes[m][1], generator=g) for m in GROUPS[0]]
    want = [o.clone() for o in outs]
    pool.apply_group(want, x, 0, GROUPS[0], LoRABatch(segments=[(0, 2, 0), (3, 6, 2)]))  # row 2: no adapter
    fused = torch.cat(outs, dim=1)  # [6, q + k + v]
    plan = sgmv.plan_tokens(torch.tensor([0, 0, NO, 2, 2, 2]), num_slots=3)
    ax = sgmv.lora_shrink(x, pool.a_groups[GROUPS[0]][0], plan)
    scales = torch.tensor(pool.scale, dtype=torch.float32)
    col = 0
    for i, m in enumerate(GROUPS[0]):
        sgmv.lora_expand_(fused, ax, pool.b[m][0], scales, plan, r0=i * max_rank, col0=col)
        col += shapes[m][1]
    torch.testing.assert_close(fused, torch.cat(want, dim=1), atol=1e-4, rtol=1e-4)

"""Multi-LoRA shrink/expand driven by a per-token adapter index (Punica's SGMV; Chen et al., 2023).

    ax[t]                        = x[t] @ A[slot[t]].T                      (shrink)
    y[t, off:off + out]         += scale[slot[t]] * ax[t, r0:r0 + r] @ B[slot[t]].T   (expand)

for every token row t with an adapter; rows with ``slot[t] == NO_ADAPTER`` are left alone. A step's tokens
come in any order: ``plan_tokens`` sorts them by slot on the device (fixed shapes, no host sync, so it runs
inside a CUDA graph) and each program takes a tile of one slot's rows, so A and B are read once per tile and
the GEMMs run as ``tl.dot`` tiles instead of per-row products. The grid covers every slot and the worst case
of rows per slot; programs without rows do nothing.

The buffers are the engine's ``LoRAPool`` layout: A ``[slots, n * max_rank, in]`` (q/k/v or gate/up stacked,
one shrink for the group), B ``[slots, out, max_rank]`` per module; an expand writes its module's columns of a
fused QKV or gate_up output.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

NO_ADAPTER = -1  # slot index of a token row without an adapter (the kernels' ABI, as in Punica and vLLM)


@dataclass(slots=True)
class TokenPlan:
    """Token rows grouped by adapter slot, built once per step and shared by every layer and module."""

    order: torch.Tensor  # [num_tokens] int32, token rows sorted by slot (rows without an adapter first)
    starts: torch.Tensor  # [num_slots] int32, offset in ``order`` of each slot's first row
    counts: torch.Tensor  # [num_slots] int32, rows of each slot
    num_slots: int


def plan_tokens(token_slots: torch.Tensor, num_slots: int) -> TokenPlan:
    """Groups token rows by slot. token_slots: [num_tokens] int, ``NO_ADAPTER`` or a slot in [0, num_slots)."""
    key = token_slots.long() + 1  # [num_tokens]; 0 = no adapter
    order = torch.argsort(key, stable=True).to(torch.int32)
    counts = torch.zeros(num_slots + 1, dtype=torch.long, device=key.device).scatter_add_(
        0, key, torch.ones_like(key))  # [num_slots + 1]; scatter, not bincount: no host sync
    starts = torch.cumsum(counts, 0) - counts
    return TokenPlan(order=order, starts=starts[1:].to(torch.int32), counts=counts[1:].to(torch.int32),
                     num_slots=num_slots)


@triton.jit
def _slot_rows(order_ptr, starts_ptr, slot, tile, count, BLOCK_M: tl.constexpr):
    """The token rows of one tile of ``slot``'s rows (grouped by ``plan_tokens``), and which of them are real."""
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < count
    return tl.load(order_ptr + tl.load(starts_ptr + slot) + m, mask=m_mask, other=0).to(tl.int64), m_mask


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, out_ptr, order_ptr, starts_ptr, counts_ptr, n_in, n_r,
    stride_xt, stride_as, stride_ar, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.program_id(1)
    count = tl.load(counts_ptr + slot)
    if tile * BLOCK_M < count:
        rows, m_mask = _slot_rows(order_ptr, starts_ptr, slot, tile, count, BLOCK_M)  # [M] each
        r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_mask = r < n_r
        acc = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < n_in
            x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)  # [M, K]
            a = tl.load(a_ptr + slot.to(tl.int64) * stride_as + r[None, :] * stride_ar + k[:, None],
                        mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [K, R] = A[slot].T tile
            acc += tl.dot(x, a, input_precision="ieee")
        tl.store(out_ptr + rows[:, None] * stride_ot + r[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & r_mask[None, :])


def lora_shrink(x: torch.Tensor, a: torch.Tensor, plan: TokenPlan, out: torch.Tensor | None = None,
                block_m: int = 16, block_k: int = 64) -> torch.Tensor:
    """``out[t] = x[t] @ a[slot[t]].T`` for rows with an adapter (other rows of ``out`` are not written).

    Args:
        x: Shape: [num_tokens, in].
        a: Shape: [num_slots, R, in] (R = n * max_rank for a stacked group).
    Returns:
        Shape: [num_tokens, R].
    """
    num_tokens, n_in = x.shape
    n_r = a.shape[1]
    if a.stride(-1) != 1 or x.stride(-1) != 1:
        raise ValueError("lora_shrink needs a contiguous last dimension")
    out = x.new_empty(num_tokens, n_r) if out is None else out
    block_r = min(64, max(16, triton.next_power_of_2(n_r)))
    grid = (triton.cdiv(num_tokens, block_m), plan.num_slots, triton.cdiv(n_r, block_r))
    _shrink_kernel[grid](x, a, out, plan.order, plan.starts, plan.counts, n_in, n_r,
                         x.stride(0), a.stride(0), a.stride(1), out.stride(0),
                         BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=min(block_k, triton.next_power_of_2(n_in)))
    return out


@triton.jit
def _expand_kernel(
    ax_ptr, b_ptr, y_ptr, scales_ptr, order_ptr, starts_ptr, counts_ptr, n_out, rank, r0, col0,
    stride_axt, stride_bs, stride_bo, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tile = tl.program_id(0)
    slot = tl.program_id(1)
    count = tl.load(counts_ptr + slot)
    if tile * BLOCK_M < count:
        rows, m_mask = _slot_rows(order_ptr, starts_ptr, slot, tile, count, BLOCK_M)  # [M] each
        n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < n_out
        r = tl.arange(0, BLOCK_R)
        r_mask = r < rank
        ax = tl.load(ax_ptr + rows[:, None] * stride_axt + r0 + r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                     other=0.0)  # [M, R]
        b = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + n[None, :] * stride_bo + r[:, None],
                    mask=n_mask[None, :] & r_mask[:, None], other=0.0)  # [R, N] = B[slot].T tile
        delta = tl.dot(ax, b, input_precision="ieee") * tl.load(scales_ptr + slot)  # [M, N]
        y_off = rows[:, None] * stride_yt + col0 + n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptr + y_off, mask=mask, other=0.0)
        tl.store(y_ptr + y_off, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)


def lora_expand_(y: torch.Tensor, ax: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, plan: TokenPlan,
                 r0: int = 0, col0: int = 0, block_m: int = 16, block_n: int = 64) -> None:
    """``y[t, col0:col0 + out] += scales[slot[t]] * ax[t, r0:r0 + rank] @ b[slot[t]].T`` in place, for rows
    with an adapter.

    Args:
        y: Shape: [num_tokens, width] (a fused QKV / gate_up output; ``col0`` picks the module's columns).
        ax: Shape: [num_tokens, R] (``lora_shrink``'s output; ``r0`` picks the module's ranks).
        b: Shape: [num_slots, out, rank].
        scales: Shape: [num_slots] float32, alpha / r per slot.
    """
    num_tokens = y.shape[0]
    num_slots, n_out, rank = b.shape
    if b.stride(-1) != 1 or y.stride(-1) != 1 or ax.stride(-1) != 1:
        raise ValueError("lora_expand_ needs a contiguous last dimension")
    grid = (triton.cdiv(num_tokens, block_m), plan.num_slots, triton.cdiv(n_out, block_n))
    _expand_kernel[grid](ax, b, y, scales, plan.order, plan.starts, plan.counts, n_out, rank, r0, col0,
                         ax.stride(0), b.stride(0), b.stride(1), y.stride(0),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)))

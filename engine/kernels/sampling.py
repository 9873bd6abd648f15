"""Sampling on the device, one launch per step: temperature, top-k, top-p and min-p without sorting the
vocabulary, each row's draws from a counter-based generator (Philox keyed by the row's seed, counted by its
step), so a row's token depends on its logits, seed and step alone: not on its batch-mates, its row, or the
order of launches.

One program per row. ``q_t = exp((x_t - max x) / T)`` (the top token's is 1). The tokens a row keeps are those
with ``q_t >= thr`` for one threshold: each filter keeps a prefix of the tokens ranked by q, so their
intersection is a prefix too (top-k: fewer than k tokens rank above; top-p: the probability of the tokens
above is below p, vLLM's rule; min-p: ``q_t >= min_p``). Instead of sorting to find ``thr`` the kernel samples
by rejection with two pivots (FlashInfer's sorting-free sampling, Ye et al., 2025):

- draw j from the tokens with ``q > low`` (initially all), in proportion to q, by one uniform and a running
  sum over the vocabulary;
- one more pass counts the tokens and their mass above ``q_j`` and above ``mid = (q_j + high) / 2``;
- j is kept by every filter: it is the token. Otherwise every token at or below ``q_j`` is dropped too (the
  filters are monotone in q), so ``low = q_j``; if ``mid`` would be dropped as well, ``low = mid``, else
  ``high = mid``. The bracket [low, high] holds the threshold and at least halves each round.

An accepted draw is a draw from the kept tokens in proportion to their probability (the tokens above ``low``
always include them), so the result is the filtered distribution exactly. Rounds are few when the kept set
holds most of the mass (top-p 0.9: the first draw is kept 90% of the time); ``MAX_ROUNDS`` bounds a row, which
then takes its top token (the kept set's surest member; ``rounds`` reports how many each row took). A row with
temperature 0 takes the top token (the first on ties, as ``argmax``) and reads the vocabulary once.

Ties: tokens tied at the k-th place or at the top-p boundary are all kept (the counts compare strictly), where
the CPU path's sort keeps exactly k of them in sort order.

Row parameters come from one int32 buffer [7, rows] (``PARAMS``), which the engine keeps on the device: floats
as their bits, the 64-bit seed as two halves; with ``count_steps`` the kernel adds one to each row's step after
drawing, so decode steps of the same rows need no copy of it (``device_sampling.py``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

PARAMS = ("temperature", "top_p", "min_p", "top_k", "seed_lo", "seed_hi", "step")  # rows of the int32 buffer
MAX_ROUNDS = 32  # rejection rounds per row and step; also the stride of a row's Philox counter per step
BLOCK_V = 1024  # vocabulary entries a program reads at once

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scaled(base, start, offs, vocab, top, inv_t):
    """q = exp((x - top) / T) of the vocabulary entries [start, start + BLOCK), 0 past the end."""
    x = tl.load(base + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
    return tl.exp2((x - top) * inv_t)


@triton.jit
def _sample_kernel(logits_ptr, stride, params_ptr, num_rows, vocab, out_ptr, rounds_ptr,
                   COUNT_STEPS: tl.constexpr, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    offs = tl.arange(0, BLOCK)
    p = params_ptr + row
    temperature = tl.load(p).to(tl.float32, bitcast=True)
    top_p = tl.load(p + num_rows).to(tl.float32, bitcast=True)
    min_p = tl.load(p + 2 * num_rows).to(tl.float32, bitcast=True)
    top_k = tl.load(p + 3 * num_rows)
    seed = (tl.load(p + 5 * num_rows).to(tl.int64) << 32) | (tl.load(p + 4 * num_rows).to(tl.int64) & 0xFFFFFFFF)
    step = tl.load(p + 6 * num_rows)
    counter = step.to(tl.int64) * MAX_ROUNDS

    top = float("-inf")  # pass 1: the top logit and its first index
    best = 0
    for start in range(0, vocab, BLOCK):
        x = tl.load(base + start + offs, mask=start + offs < vocab, other=float("-inf")).to(tl.float32)
        block_top = tl.max(x, 0)
        best = tl.where(block_top > top, start + tl.argmax(x, 0), best)
        top = tl.maximum(top, block_top)
    token = best
    rnd = 0
    if (temperature > 0) & (top > float("-inf")):
        inv_t = tl.minimum(LOG2E / temperature, 3.0e38)  # a denormal temperature: greedy, not inf * 0 = NaN
        total = 0.0  # pass 2: the mass of all tokens (q of the top one is 1)
        for start in range(0, vocab, BLOCK):
            total += tl.sum(_scaled(base, start, offs, vocab, top, inv_t), 0)
        all_p = top_p >= 1.0  # every token is kept: no mass comparison that rounding could fail
        p_mass = top_p * total
        low = 0.0  # every token with q <= low is dropped
        high = 1.0
        low_mass = total  # the mass of the tokens above low
        done = 0
        while (done == 0) & (rnd < MAX_ROUNDS):
            target = tl.rand(seed, counter + rnd) * low_mass
            before = 0.0  # draw: the first token above low where the running mass passes target
            found = vocab
            last = -1  # the last token above low (when rounding leaves target past the end)
            for start in range(0, vocab, BLOCK):
                q = _scaled(base, start, offs, vocab, top, inv_t)
                q = tl.where(q > low, q, 0.0)
                running = before + tl.cumsum(q, 0)
                idx = start + offs
                found = tl.minimum(found, tl.min(tl.where((running > target) & (q > 0), idx, vocab), 0))
                last = tl.maximum(last, tl.max(tl.where(q > 0, idx, -1), 0))
                before += tl.sum(q, 0)
            j = tl.where(found < vocab, found, tl.where(last >= 0, last, best))  # the top token is above low
            q_j = tl.exp2((tl.load(base + j).to(tl.float32) - top) * inv_t)
            mid = (q_j + high) * 0.5
            above_j = 0  # tokens and mass strictly above q_j and above mid
            mass_j = 0.0
            above_mid = 0
            mass_mid = 0.0
            for start in range(0, vocab, BLOCK):
                q = _scaled(base, start, offs, vocab, top, inv_t)
                above_j += tl.sum((q > q_j).to(tl.int32), 0)
                mass_j += tl.sum(tl.where(q > q_j, q, 0.0), 0)
                above_mid += tl.sum((q > mid).to(tl.int32), 0)
                mass_mid += tl.sum(tl.where(q > mid, q, 0.0), 0)
            # the top token is always kept (the CPU path's rule: nothing ranks above it), whatever rounding
            # did to a tiny top-p: so low stays below 1 and the top token above it
            keep_j = ((above_j < top_k) & ((mass_j < p_mass) | all_p) & (q_j >= min_p)) | (above_j == 0)
            keep_mid = (above_mid < top_k) & ((mass_mid < p_mass) | all_p) & (mid >= min_p)
            token = tl.where(keep_j, j, token)
            done = keep_j.to(tl.int32)
            low, high, low_mass = (tl.where(keep_mid, q_j, mid), tl.where(keep_mid, mid, high),
                                   tl.where(keep_mid, mass_j, mass_mid))
            rnd += 1
    tl.store(out_ptr + row, token)
    tl.store(rounds_ptr + row, rnd)
    if COUNT_STEPS:  # the row's next token is its next step: the host need not copy the counter
        tl.store(p + 6 * num_rows, step + 1)


def sample_rows(logits: torch.Tensor, params: torch.Tensor, out: torch.Tensor | None = None,
                rounds: torch.Tensor | None = None, count_steps: bool = False) -> torch.Tensor:
    """One token per row of ``logits``, by the row's parameters.

    Args:
        logits: Shape: [R, V], float32 or bf16, rows contiguous (penalties, biases and grammar masks applied).
        params: Shape: [7, >= R] int32 (``PARAMS``): temperature (0 = greedy), top-p, min-p (float32 bits),
            top-k (>= V keeps every token), the seed's low and high 32 bits, the row's step (tokens it has
            generated). Column r is row r's.
        out: Shape: [R] int32, written; allocated when None.
        rounds: Shape: [R] int32: each row's rejection rounds are written there (0 for a greedy row;
            ``MAX_ROUNDS`` means the row ran out and took its top token), for benchmarks and tests.
        count_steps: add one to each row's step in ``params`` after drawing (the device-side counters).
    Returns:
        Shape: [R] int32 token ids.
    """
    rows, vocab = logits.shape
    assert logits.stride(1) == 1 and params.shape[0] == len(PARAMS) and params.shape[1] >= rows
    out = torch.empty(rows, dtype=torch.int32, device=logits.device) if out is None else out
    rounds = torch.empty(rows, dtype=torch.int32, device=logits.device) if rounds is None else rounds
    if rows:
        _sample_kernel[(rows,)](logits, logits.stride(0), params, params.stride(0), vocab, out, rounds,
                                COUNT_STEPS=count_steps, MAX_ROUNDS=MAX_ROUNDS,
                                BLOCK=min(BLOCK_V, triton.next_power_of_2(vocab)))
    return out

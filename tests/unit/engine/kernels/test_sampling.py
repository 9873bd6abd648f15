"""The device sampler (one launch, no vocabulary sort, counter-based draws) in Triton's interpreter: each row's
draws land in exactly the set the CPU path's filters keep, in the CPU path's proportions; greedy rows take the
first top token; a row's token depends on its logits, seed and step alone; and the persistent parameter
buffer is rewritten only when the batch's rows change."""
from __future__ import annotations

import struct

import pytest
import torch

from llmaas.engine import SamplingParams
from llmaas.engine.sampler import apply_min_p, apply_top_k_top_p
from llmaas.engine.sequence import Sequence

from .interpreter import interpreted

sampling = interpreted("sampling")
VOCAB = 24
OFF = (1 << 31) - 1  # top-k that keeps every token


def params(configs: list[dict], seeds: list[int] | None = None, step: int = 0) -> torch.Tensor:
    """The kernel's [7, R] int32 parameter buffer, one column per config (temperature, top_p, min_p, top_k)."""
    rows = len(configs)
    floats = torch.tensor([[c.get("temperature", 1.0), c.get("top_p", 1.0), c.get("min_p", 0.0)] for c in configs],
                          dtype=torch.float32)
    out = torch.zeros(len(sampling.PARAMS), rows, dtype=torch.int32)
    out[:3] = floats.T.contiguous().view(torch.int32)
    out[3] = torch.tensor([c.get("top_k", OFF) for c in configs], dtype=torch.int32)
    out[4] = torch.tensor(seeds if seeds is not None else range(rows), dtype=torch.int32)
    out[6] = step
    return out


def reference_probs(logits: torch.Tensor, config: dict) -> torch.Tensor:
    """The CPU path's filtered distribution (engine/sampler.py, which sorts). logits: [V] -> [V]."""
    scaled = logits[None] / config.get("temperature", 1.0)
    kept = apply_top_k_top_p(scaled, torch.tensor([min(config.get("top_k", VOCAB), VOCAB)]),
                             torch.tensor([config.get("top_p", 1.0)]))
    return apply_min_p(kept, torch.tensor([config.get("min_p", 0.0)])).softmax(-1)[0]


CONFIGS = {  # name: (config, rows drawn)
    "temperature": (dict(temperature=1.3), 80),
    "top-p": (dict(top_p=0.7), 80),
    "min-p": (dict(min_p=0.15, temperature=0.8), 80),
    "all": (dict(top_k=8, top_p=0.9, min_p=0.05), 80),
    # a hot temperature flattens the distribution: the first draw is mostly rejected, so these rows go
    # through several rounds of the pivots (the rounds' own draws, the mass above the new low)
    "top-k, flat": (dict(top_k=3, temperature=4.0), 200),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_draws_follow_the_cpu_paths_filtered_distribution(dtype):
    """One launch of mixed rows: every draw is a token the sorted filters keep, and each config's counts
    fit the kept tokens' probabilities (chi-square, p > 0.001; fp32 only, bf16 checks the kept set)."""
    logits = (torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 1.5).to(dtype)
    share = 1 if dtype == torch.float32 else 4  # bf16: fewer rows
    configs = [config for config, rows in CONFIGS.values() for _ in range(rows // share)]
    rounds = torch.zeros(len(configs), dtype=torch.int32)
    tokens = sampling.sample_rows(logits.expand(len(configs), VOCAB).contiguous(), params(configs),
                                  rounds=rounds).long()
    assert rounds[-CONFIGS["top-k, flat"][1] // share:].float().mean() > 1.5  # the pivots' path did run
    assert rounds.max() < sampling.MAX_ROUNDS  # no row ran out of rounds
    start = 0
    for name, (config, rows) in CONFIGS.items():
        drawn, start = tokens[start:start + rows // share], start + rows // share
        want = reference_probs(logits.float(), config)
        assert set(drawn.tolist()) <= set(want.nonzero()[:, 0].tolist()), name
        if dtype == torch.float32:
            counts = torch.bincount(drawn, minlength=VOCAB).double()
            expected = want.double() * len(drawn)
            kept = expected > 0
            chi2 = (((counts - expected)[kept]) ** 2 / expected[kept]).sum()
            p_value = torch.special.gammaincc((kept.sum().double() - 1) / 2, chi2 / 2)
            assert p_value > 1e-3, f"{name}: chi2 {chi2:.1f} over {int(kept.sum())} tokens, p = {p_value:.2g}"


def test_filters_that_keep_one_token_and_greedy_rows_take_the_first_top_token():
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(1))
    logits[[7, 19]] = logits.max() + 1  # a tie at the top: argmax's first index, 7
    configs = [dict(temperature=0.0), dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0), dict(temperature=0.0)]
    batch = logits.expand(len(configs), VOCAB).contiguous()
    batch[-1] = float("-inf")
    batch[-1, 3] = 0.0  # a row whose mask left one token
    got = sampling.sample_rows(batch, params(configs)).tolist()
    assert got[0] == 7 and got[4] == 3
    assert set(got[1:4]) <= {7, 19}  # tied top tokens are both kept by every filter


def test_degenerate_parameters_take_the_top_token_and_read_inside_the_vocabulary():
    """A denormal temperature (1/T overflows), a top-p that packs to 0, a row with one finite logit: each
    takes its top token, never an index outside the vocabulary (an out-of-range token kills a CUDA context)."""
    logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(4))
    configs = [dict(temperature=1e-39), dict(temperature=1e-45), dict(top_p=1e-45), dict(top_k=2, top_p=1e-45),
               dict(temperature=1.0)]
    batch = logits.expand(len(configs), VOCAB).contiguous()
    batch[-1] = float("-inf")
    batch[-1, 5] = 0.0
    rounds = torch.zeros(len(configs), dtype=torch.int32)
    got = sampling.sample_rows(batch, params(configs), rounds=rounds).tolist()
    assert got == [int(logits.argmax())] * 4 + [5]
    assert rounds.max() < sampling.MAX_ROUNDS  # the top token was kept, not fallen back to


def test_a_rows_token_depends_on_its_logits_seed_and_step_alone():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, VOCAB, generator=g)
    config = [dict(top_p=0.95)] * 6
    seeds = [11, 12, 13, 14, 15, 16]
    alone = [sampling.sample_rows(logits[i:i + 1], params(config[:1], [s], step=3)).item()
             for i, s in enumerate(seeds)]
    perm = [4, 0, 5, 2, 1, 3]  # other rows, other order, one launch
    together = sampling.sample_rows(logits[perm].contiguous(), params(config, [seeds[i] for i in perm], step=3))
    assert [alone[i] for i in perm] == together.tolist()
    flat = torch.zeros(1, VOCAB)  # uniform: a new step must give new draws
    steps = [sampling.sample_rows(flat, params([{}], [7], step=t)).item() for t in range(12)]
    assert len(set(steps)) > 3
    assert steps[5] == sampling.sample_rows(flat, params([{}], [7], step=5)).item()  # and a step repeats


def test_device_sampler_packs_parameters_once_and_counts_steps_on_the_device():
    from llmaas.engine import device_sampling

    original = device_sampling.sampling
    device_sampling.sampling = sampling
    try:
        def fresh_tokens(seqs, logits):  # what a new sampler (one full copy) draws for these rows now
            other = device_sampling.DeviceSampler(4, "cpu")
            for seq in seqs:
                other._packed[seq.request_id] = sampler._packed[seq.request_id]
            return other.sample(logits, seqs).tolist()

        sampler = device_sampling.DeviceSampler(4, "cpu")
        seqs = [Sequence(f"r{i}", [1, 2], SamplingParams(temperature=0.5 + i, top_p=0.9, top_k=3 if i else None,
                                                          seed=-1 if i == 0 else (1 << 64) - 2), arrival=i)
                for i in range(3)]
        for seq in seqs:
            sampler.add(seq)
        logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
        first = sampler.sample(logits, seqs).tolist()
        cols = sampler.host[:, :3]
        assert struct.unpack("<3f", struct.pack("<3i", *cols[:3, 1].tolist())) == pytest.approx((1.5, 0.9, 0.0))
        assert cols[3].tolist() == [device_sampling.ALL_TOKENS, 3, 3]
        seed0 = (cols[5, 0].item() << 32) | (cols[4, 0].item() & 0xFFFFFFFF)
        assert seed0 & ((1 << 64) - 1) == (1 << 64) - 1  # -1 as its 64 bits
        assert torch.equal(sampler.static[:6], sampler.host[:6]) and sampler.static[6, :3].tolist() == [1, 1, 1]
        assert sampler.sample(logits, seqs).tolist() == first  # the same step again: copied back, same draws
        assert sampler.num_copies == 2
        for step in range(3):  # decode steps of the same rows: the counters move on the device, nothing copied
            for seq in seqs:
                seq.output_token_ids.append(5)
            logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(10 + step)) * 0.3
            assert sampler.sample(logits, seqs).tolist() == fresh_tokens(seqs, logits)
        assert sampler.num_copies == 2 and sampler.static[6, :3].tolist() == [4, 4, 4]
        seqs[1].output_token_ids.append(5)  # one row moved on its own (not a plain decode step): copied
        assert sampler.sample(logits, seqs).tolist() == fresh_tokens(seqs, logits)
        assert sampler.num_copies == 3 and sampler.num_rewrites == 1
        sampler.sample(logits[1:], seqs[1:])  # a row left: the columns shift and are rewritten
        assert sampler.num_rewrites == 2 and sampler.host[3, :2].tolist() == [3, 3]
    finally:
        device_sampling.sampling = original

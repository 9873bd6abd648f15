from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmaas.engine.sampler import apply_top_k, apply_top_k_top_p, sample
from llmaas.engine.sampling_params import SamplingParams


def logits_rows(rows: int = 4, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_p=1e-6),
])
def test_degenerate_settings_are_greedy(params):
    logits = logits_rows()
    got = sample(logits.clone(), [params] * 4, [None] * 4)
    torch.testing.assert_close(got, logits.argmax(-1))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_keeps_exactly_k(k):
    logits = logits_rows()
    out = apply_top_k_top_p(logits, torch.full((4,), k), torch.ones(4))
    assert (out > float("-inf")).sum(-1).tolist() == [k] * 4
    kept = out > float("-inf")
    assert torch.equal(kept, logits >= logits.topk(k, -1).values[:, -1:])


@pytest.mark.parametrize("ks", [[1, 3, 10, 3], [5, 5, 5, 5]])
def test_top_k_alone_keeps_what_the_sort_keeps_without_sorting(ks):
    logits = logits_rows()
    top_k = torch.tensor(ks)
    want = apply_top_k_top_p(logits, top_k, torch.ones(4))
    ops = OpNames()
    with ops:
        got = apply_top_k(logits, top_k, max(ks))
    assert torch.equal(got, want)
    assert "sort" not in ops.names and "topk" in ops.names


def test_top_k_holds_beside_rows_without_one():
    """A top-k row sampled with a temperature-only row (no top-p anywhere: the topk path) stays in its top k."""
    logits = logits_rows(rows=2)
    params = [SamplingParams(temperature=1.5, top_k=3), SamplingParams(temperature=1.5)]
    allowed = set(logits[0].topk(3).indices.tolist())
    picks = [sample(logits.clone(), params, [None, None]) for _ in range(200)]
    assert {int(p[0]) for p in picks} <= allowed
    assert len({int(p[1]) for p in picks}) > 3  # the other row is not limited


def test_sampling_a_mixed_batch_reads_nothing_back_from_the_device():
    """The sampled tokens are the step's only device -> host read: which filters run is decided on the host."""
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=5),
              SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.2, min_p=0.1)]
    ops = OpNames()
    with ops:
        sample(logits_rows(), params, [None] * 4)
    assert not {"_local_scalar_dense", "is_nonzero", "item"} & ops.names, ops.names


class OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    out = apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.7]))
    assert (out > float("-inf")).tolist() == [[True, True, False, False]]


def test_samples_stay_inside_top_k():
    logits = logits_rows(rows=1, vocab=100)
    allowed = set(logits.topk(5, -1).indices[0].tolist())
    params = [SamplingParams(temperature=1.5, top_k=5)]
    for i in range(200):
        assert sample(logits.clone(), params, [torch.Generator().manual_seed(i)]).item() in allowed


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log()[None]
    gen = torch.Generator().manual_seed(0)
    draws = [sample(logits.clone(), [SamplingParams(temperature=1.0)], [gen]).item() for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / 3000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_logit_bias_bans_and_forces_tokens_per_row():
    logits = logits_rows(rows=3)
    top = logits.argmax(dim=-1)
    params = [SamplingParams(temperature=0.0, logit_bias=((int(top[0]), -100.0),)),  # the greedy pick is banned
              SamplingParams(temperature=1.0, logit_bias=((7, 100.0),), seed=1),  # forced even when sampling
              SamplingParams(temperature=0.0)]  # no bias: untouched by its neighbours'
    gens = [None, torch.Generator().manual_seed(1), None]
    tokens = sample(logits.clone(), params, gens).tolist()
    assert tokens[0] != int(top[0]) and tokens[1] == 7 and tokens[2] == int(top[2])


@pytest.mark.parametrize("bias", [((1, 100.5),), ((1, float("nan")),), ((-1, 1.0),),
                                  tuple((i, 1.0) for i in range(301))])
def test_logit_bias_is_bounded(bias):
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=bias)

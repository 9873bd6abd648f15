"""Reported logprobs are the model's raw distribution: log_softmax of the logits, before penalties,
temperature and top-k/top-p/min-p (OpenAI's and vLLM's default; README promises it).

The reference is independent of the engine: transformers' own forward over the prompt plus the
generated tokens (teacher forcing), log_softmax at each position that produced a token.
"""
from __future__ import annotations

import copy

import pytest
import torch

from llmaas.engine import EngineConfig, LLMEngine, SamplingParams
from tests.models import tiny_llama

NUM_TOP = 5
ATOL = 1e-4  # fp32 throughout; our paged forward and HF's dense one differ by ~1e-6 here

SAMPLED = [
    # every penalty on, and a temperature far from 1
    SamplingParams(max_tokens=24, temperature=1.7, presence_penalty=0.8, frequency_penalty=0.6,
                   repetition_penalty=1.4, seed=7, ignore_eos=True, logprobs=NUM_TOP),
    # the truncations too: top-k, top-p and min-p mask the sampling distribution, never the report
    SamplingParams(max_tokens=24, temperature=0.6, top_k=20, top_p=0.8, min_p=0.05, frequency_penalty=-0.5,
                   seed=11, ignore_eos=True, logprobs=NUM_TOP),
    # greedy under a repetition penalty: the argmax is of penalized logits, the report of raw ones
    SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=1.8, ignore_eos=True, logprobs=NUM_TOP),
]


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def prompt_of(length: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_with_logprobs(model, prompts: list[list[int]], params: list[SamplingParams]):
    """Generates all prompts in one batch; returns (tokens, logprob entries) per prompt."""
    engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=4,
                                                          max_loras=0))
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    entries: dict[str, list] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            tokens[out.request_id] += out.new_token_ids
            entries[out.request_id] += out.logprobs
    return [(tokens[str(i)], entries[str(i)]) for i in range(len(prompts))]


def hf_logits(model, prompt: list[int], generated: list[int]) -> torch.Tensor:
    """[len(generated), V]: HF's logits at each position that predicted a generated token."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0].float()  # [P + G, V]
    return logits[len(prompt) - 1:-1]


@pytest.mark.parametrize("params", SAMPLED, ids=["temperature-and-penalties", "truncations", "greedy-penalized"])
def test_reported_logprobs_are_raw_log_softmax(model, params):
    # The request under test shares its batch with a plain greedy one and a differently penalized one, so a
    # row mix-up in the sampler shows too.
    prompts = [prompt_of(13, seed=1), prompt_of(9, seed=2), prompt_of(21, seed=3)]
    others = SamplingParams(max_tokens=24, temperature=1.2, presence_penalty=-1.0, seed=3, ignore_eos=True,
                            logprobs=2)
    batch = [params, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1), others]
    results = run_with_logprobs(model, prompts, batch)
    for prompt, p, (tokens, entries) in zip(prompts, batch, results):
        assert len(tokens) == len(entries) == 24
        ref = torch.log_softmax(hf_logits(model, prompt, tokens), dim=-1)  # [24, V]
        assert [e.token_id for e in entries] == tokens
        got = torch.tensor([e.logprob for e in entries])
        torch.testing.assert_close(got, ref.gather(-1, torch.tensor(tokens)[:, None])[:, 0], atol=ATOL, rtol=0)
        for step, e in enumerate(entries):
            want = ref[step].topk(p.logprobs)
            assert [t for t, _ in e.top] == want.indices.tolist(), f"top ids differ at step {step}"
            torch.testing.assert_close(torch.tensor([v for _, v in e.top]), want.values, atol=ATOL, rtol=0)


def test_penalties_and_temperature_really_changed_the_sampling_distribution(model):
    """Guards the test above: with these settings the processed distribution is far from the raw one, so a
    report taken after penalties or temperature could not pass within ATOL."""
    params = SAMPLED[0]
    prompt = prompt_of(13, seed=1)
    [(tokens, entries)] = run_with_logprobs(model, [prompt], [params])
    raw = hf_logits(model, prompt, tokens)  # [24, V]
    seen = set(prompt)
    worst = 0.0
    for step, token in enumerate(tokens):
        logits = raw[step].clone()  # [V]
        out = tokens[:step]
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
        idx = torch.tensor(sorted(seen | set(out)))
        vals = logits[idx]
        logits[idx] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
        processed = torch.log_softmax(logits / params.temperature, dim=-1)
        worst = max(worst, abs(float(processed[token]) - entries[step].logprob))
    assert worst > 100 * ATOL


def test_prompt_logprobs_equal_transformers_through_chunks_and_a_cached_prefix(model):
    """echo's prompt logprobs: position p's log_softmax at token p + 1, for every prompt token after the first,
    in prefill chunks of 8 tokens, and again for a prompt whose leading blocks another request left cached."""
    prompt = prompt_of(37, seed=5)
    engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=256, num_kv_blocks=64, block_size=4,
                                                          max_loras=0, max_num_batched_tokens=8, max_num_seqs=4))
    engine.generate([prompt], SamplingParams(max_tokens=1))  # leaves the prompt's blocks in the prefix cache
    engine.add_request("echo", prompt, SamplingParams(max_tokens=2, prompt_logprobs=3))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    firsts = [o.prompt_logprobs for o in outputs]
    assert firsts[0] is not None and firsts[1:] == [None]  # with the first token only
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)  # [P - 1, V]
    got = firsts[0]
    assert [e.token_id for e in got] == prompt[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in got]),
                               expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], atol=ATOL, rtol=0)
    top = expected.topk(3)
    assert [[t for t, _ in e.top] for e in got] == top.indices.tolist()

"""Engine parity with transformers generate() and scheduling behaviour, on tiny random Llamas."""
from __future__ import annotations

import copy

import pytest
import torch

from llmaas.engine import EngineConfig, FinishReason, InvalidRequestError, LLMEngine, SamplingParams
from tests.models import tiny_llama

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=0)


def hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False)
    return out[0, len(prompt):].tolist()


def make_engine(model, **overrides) -> LLMEngine:
    cfg = dict(max_model_len=512, num_kv_blocks=128, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    cfg.update(overrides)
    return LLMEngine(copy.deepcopy(model), EngineConfig(**cfg))


def prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("length", [1, 3, 16, 17, 63])
def test_greedy_matches_hf_generate(model, length):
    (prompt,) = prompts([length])
    assert make_engine(model).generate([prompt], GREEDY)[0] == hf_greedy(model, prompt, 24)


def test_mixed_length_batch_matches_hf_generate(model):
    batch = prompts([2, 9, 31, 50, 5])
    expected = [hf_greedy(model, p, 24) for p in batch]
    assert make_engine(model).generate(batch, GREEDY) == expected


@pytest.mark.parametrize("budget", [8, 13, 64])
def test_chunked_prefill_keeps_outputs(model, budget):
    batch = prompts([40, 70, 3])
    expected = [hf_greedy(model, p, 24) for p in batch]
    engine = make_engine(model, max_num_batched_tokens=budget, max_num_seqs=3)
    assert engine.generate(batch, GREEDY) == expected


def test_requests_joining_mid_run_match(model):
    batch = prompts([12, 25, 7, 40])
    expected = [hf_greedy(model, p, 24) for p in batch]
    engine = make_engine(model)
    got: dict[str, list[int]] = {str(i): [] for i in range(4)}
    engine.add_request("0", batch[0], GREEDY)
    steps = 0
    while engine.has_unfinished() or steps < 12:
        if steps in (3, 7, 11):  # the rest arrive while request 0 decodes
            i = (3, 7, 11).index(steps) + 1
            engine.add_request(str(i), batch[i], GREEDY)
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        steps += 1
    assert [got[str(i)] for i in range(4)] == expected


def test_preempted_sequence_resumes_same_tokens(model):
    batch = prompts([30, 30, 30, 30])
    expected = [hf_greedy(model, p, 24) for p in batch]
    # 40 blocks x 4 slots = 160 tokens: four sequences of 54 tokens cannot all be resident.
    engine = make_engine(model, num_kv_blocks=40, max_model_len=160)
    for i, p in enumerate(batch):
        engine.add_request(str(i), p, GREEDY)
    seqs = list(engine.scheduler.waiting)
    got: dict[str, list[int]] = {str(i): [] for i in range(4)}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    assert sum(s.num_preemptions for s in seqs) > 0
    assert [got[str(i)] for i in range(4)] == expected
    assert engine.block_manager.num_free_blocks == 40


def test_abort_frees_blocks_at_once(model):
    engine = make_engine(model)
    a, b = prompts([20, 20])
    engine.add_request("a", a, GREEDY)
    engine.add_request("b", b, GREEDY)
    engine.step()
    engine.step()
    assert engine.abort_request("a")
    assert engine.num_running == 1
    used_by_b = len(engine.scheduler.running[0].block_table)
    assert engine.block_manager.num_free_blocks == 128 - used_by_b
    assert not engine.abort_request("a")


def test_stop_token_and_max_tokens_finish(model):
    (prompt,) = prompts([10])
    reference = hf_greedy(model, prompt, 24)
    engine = make_engine(model)
    stop_at = reference[5]
    first = reference.index(stop_at)
    outs = []
    engine.add_request("s", prompt, SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop_at,)))
    engine.add_request("m", prompt, SamplingParams(max_tokens=4, temperature=0.0))
    while engine.has_unfinished():
        outs.extend(engine.step())
    finals = {o.request_id: o for o in outs if o.finished}
    assert finals["s"].finish_reason is FinishReason.STOP and finals["s"].num_output_tokens == first + 1
    assert finals["m"].finish_reason is FinishReason.LENGTH and finals["m"].num_output_tokens == 4


def test_eos_ends_generation_unless_ignored(model):
    (prompt,) = prompts([10])
    reference = hf_greedy(model, prompt, 24)
    eos = reference[3]
    engine = LLMEngine(copy.deepcopy(model), EngineConfig(max_model_len=512, num_kv_blocks=64, block_size=4,
                                                          eos_token_ids=(eos,)))
    stopped, ignored = engine.generate([prompt, prompt], [SamplingParams(max_tokens=24, temperature=0.0),
                                                         SamplingParams(max_tokens=24, temperature=0.0,
                                                                        ignore_eos=True)])
    assert stopped == reference[:reference.index(eos) + 1]
    assert ignored == reference


def test_seeded_sampling_is_reproducible_whatever_the_batch(model):
    (prompt,) = prompts([12])
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    alone = make_engine(model).generate([prompt], params)[0]
    crowd = make_engine(model).generate(
        prompts([5, 12, 30], seed=7) + [prompt],
        [SamplingParams(max_tokens=16, temperature=0.7)] * 3 + [params])[-1]
    assert alone == crowd
    other_seed = make_engine(model).generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0]
    assert other_seed != alone


def test_mixed_sampling_params_in_one_batch(model):
    batch = prompts([6, 6, 6])
    expected_greedy = hf_greedy(model, batch[0], 24)
    got = make_engine(model).generate(batch, [GREEDY, SamplingParams(max_tokens=24, temperature=1.5, seed=1),
                                              SamplingParams(max_tokens=24, temperature=0.8, top_k=1)])
    assert got[0] == expected_greedy
    assert got[2] == hf_greedy(model, batch[2], 24)  # top_k=1 is greedy whatever the temperature
    assert len(got[1]) == 24


@pytest.mark.parametrize("prompt, message", [
    ([], "empty"),
    ([300], "token ids"),
    ([-1], "token ids"),
    (list(range(200)) * 3, "context"),
])
def test_invalid_prompts_rejected_with_reason(model, prompt, message):
    with pytest.raises(InvalidRequestError, match=message):
        make_engine(model).add_request("x", prompt, GREEDY)


def test_context_limit_finishes_with_length(model):
    (prompt,) = prompts([60])
    out = make_engine(model, max_model_len=64).generate([prompt], SamplingParams(max_tokens=50, temperature=0))
    assert len(out[0]) == 4


@pytest.mark.parametrize("arch_config", [
    dict(num_key_value_heads=4),  # MHA
    dict(num_key_value_heads=1),  # MQA
    dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    dict(tie_word_embeddings=True),
])
def test_llama_variants_match_hf(arch_config):
    model = tiny_llama(seed=3, **arch_config)
    batch = prompts([9, 33])
    assert make_engine(model).generate(batch, GREEDY) == [hf_greedy(model, p, 24) for p in batch]


def test_qwen2_with_qkv_bias_matches_hf():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = Qwen2ForCausalLM(cfg).eval()
    batch = prompts([9, 21])
    assert make_engine(model).generate(batch, GREEDY) == [hf_greedy(model, p, 24) for p in batch]


def test_unsupported_architecture_named_in_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmaas.engine import UnsupportedModelError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        LLMEngine(model, EngineConfig(max_model_len=64, num_kv_blocks=8))


def test_repetition_penalty_greedy_equals_hf(model):
    (prompt,) = prompts([20])
    ids = torch.tensor([prompt])
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False,
                              repetition_penalty=1.5)[0, len(prompt):].tolist()
    got = make_engine(model).generate([prompt], SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True,
                                                               repetition_penalty=1.5))[0]
    assert got == expected
    assert got != hf_greedy(model, prompt, 24)


@pytest.mark.parametrize("presence, frequency", [(1.5, 0.0), (0.0, 1.0), (0.5, 0.5), (-1.0, 0.0)])
def test_presence_and_frequency_penalties_match_a_naive_reference(model, presence, frequency):
    (prompt,) = prompts([8])
    tokens: list[int] = []
    with torch.no_grad():  # reference: full forward each step, OpenAI's formula on generated tokens
        for _ in range(20):
            logits = model(torch.tensor([prompt + tokens])).logits[0, -1].clone()
            for t in set(tokens):
                logits[t] -= presence + frequency * tokens.count(t)
            tokens.append(int(logits.argmax()))
    got = make_engine(model).generate([prompt], SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, presence_penalty=presence, frequency_penalty=frequency))[0]
    assert got == tokens


def test_min_p_one_keeps_only_the_top_token(model):
    batch = prompts([7, 13])
    params = SamplingParams(max_tokens=16, temperature=1.5, min_p=1.0, ignore_eos=True, seed=3)
    assert make_engine(model).generate(batch, params) == [hf_greedy(model, p, 16) for p in batch]


def test_prefix_cache_reuses_shared_prompt_blocks_and_keeps_outputs(model):
    system = prompts([40], seed=11)[0]
    first, second = system + [5, 6, 7], system + [9, 10]
    engine = make_engine(model)
    assert engine.generate([first], GREEDY) == [hf_greedy(model, first, 24)]
    assert engine.block_manager.num_cached_tokens == 0
    assert engine.generate([second], GREEDY) == [hf_greedy(model, second, 24)]
    assert engine.block_manager.num_cached_tokens == 40  # ten full 4-token blocks of the shared prefix
    again = engine.generate([first], GREEDY)  # its whole prompt and more are cached now
    assert again == [hf_greedy(model, first, 24)]
    assert engine.block_manager.num_cached_tokens == 40 + 40


def test_prefix_cache_off_recomputes(model):
    system = prompts([40], seed=11)[0]
    engine = make_engine(model, enable_prefix_caching=False)
    engine.generate([system + [1]], GREEDY)
    assert engine.generate([system + [2]], GREEDY) == [hf_greedy(model, system + [2], 24)]
    assert engine.block_manager.num_cached_tokens == 0


def test_prefix_cache_survives_cache_pressure(model):
    batch = [prompts([30], seed=11)[0] + [i] for i in range(6)]
    expected = [hf_greedy(model, p, 24) for p in batch]
    engine = make_engine(model, num_kv_blocks=40, max_model_len=160)  # forces preemption and block reuse
    assert engine.generate(batch, GREEDY) == expected
    assert engine.block_manager.num_free_blocks == 40


def test_logprobs_match_the_model_distribution(model):
    (prompt,) = prompts([12])
    engine = make_engine(model)
    engine.add_request("lp", prompt, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, logprobs=3))
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    entries = [lp for o in outs for lp in o.logprobs]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert [e.token_id for e in entries] == tokens == hf_greedy(model, prompt, 3)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1].float(), -1)
    assert entries[0].logprob == pytest.approx(float(ref[tokens[0]]), abs=1e-4)
    assert [t for t, _ in entries[0].top] == ref.topk(3).indices.tolist()
    assert entries[0].top[0] == (tokens[0], pytest.approx(entries[0].logprob, abs=1e-6))
    engine.add_request("no", prompt, SamplingParams(max_tokens=2, temperature=0.0))
    assert all(o.logprobs is None for o in engine.step())


def test_n_choices_arriving_together_share_the_prompt_blocks(model):
    (prompt,) = prompts([41], seed=5)  # ten full 4-token blocks, then one token
    expected = hf_greedy(model, prompt, 24)
    engine = make_engine(model)
    assert engine.generate([prompt] * 4, GREEDY) == [expected] * 4
    assert engine.block_manager.num_cached_tokens == 3 * 40  # choices 2..4 reuse choice 1's ten blocks


def test_prefix_sharing_across_chunked_prefill(model):
    (prompt,) = prompts([41], seed=6)
    expected = hf_greedy(model, prompt, 24)
    engine = make_engine(model, max_num_batched_tokens=16, max_num_seqs=4)  # the prompt takes three steps
    assert engine.generate([prompt] * 3, GREEDY) == [expected] * 3
    assert engine.block_manager.num_cached_tokens == 2 * 40


@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_lower_precision_logits_are_exact_where_the_choice_is_made(quantization):
    """bf16: the LM head's GEMM rounds logits to bf16 steps, so its largest REFINE_TOP per row are recomputed in
    float32 from the head's rows (dense or int8) and the float32 hidden state; the argmax is float32's."""
    from llmaas.engine.model import REFINE_TOP
    from llmaas.engine.quantization import dequantize_int8

    engine = LLMEngine(tiny_llama(vocab_size=512, hidden_size=128, intermediate_size=256), EngineConfig(
        max_model_len=64, num_kv_blocks=8, dtype=torch.bfloat16, quantization=quantization))
    head = engine.model.hf_model.lm_head
    weight = head.weight.float() if quantization == "none" else dequantize_int8(head.qweight, head.scales,
                                                                                torch.float32)
    torch.manual_seed(0)
    hidden = torch.randn(6, 128) * 3  # the forward's float32 output
    logits = engine.model.compute_logits(hidden)
    exact = hidden @ weight.t()
    rounded = head(hidden.bfloat16()).float()  # what the head's GEMM alone gives
    top = rounded.topk(REFINE_TOP, dim=-1).indices  # the candidates: the GEMM's largest
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.gather(1, top), exact.gather(1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    assert (rounded.gather(1, top) - exact.gather(1, top)).abs().max() > 1e-3  # so the refinement did something


def test_bf16_forward_keeps_a_float32_residual_stream():
    """The CPU path's forward hands compute_logits float32 hidden states in bf16 too, closer to a float32
    engine's than a bf16 residual stream gets (the float32 model's hidden states as the reference)."""
    import torch.nn.functional as F

    captured: dict[torch.dtype, torch.Tensor] = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = LLMEngine(tiny_llama(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4),
                           EngineConfig(max_model_len=64, num_kv_blocks=8, dtype=dtype))
        model = engine.model
        original = model.compute_logits
        model.compute_logits = lambda hidden, d=dtype, f=original: (captured.__setitem__(d, hidden.clone()),
                                                                    f(hidden))[1]
        engine.generate([list(range(1, 20))], SamplingParams(max_tokens=1, temperature=0.0))
    assert captured[torch.bfloat16].dtype == torch.float32
    reference = captured[torch.float32]
    # a bf16 stream would hand over values on bf16's grid: the float32 one is finer than that
    assert not torch.equal(captured[torch.bfloat16], captured[torch.bfloat16].bfloat16().float())
    assert F.cosine_similarity(captured[torch.bfloat16], reference, dim=-1).min() > 0.99

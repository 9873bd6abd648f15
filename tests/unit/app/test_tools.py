"""Tool calling's parts without a model: request checks, prompt rendering, output parsing per family, streams."""
from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest

from llmaas.app.errors import InvalidRequest
from llmaas.app.prompts import PromptEncoder
from llmaas.app.protocol import ChatCompletionRequest
from llmaas.app.tools import (
    AutoStream,
    NamedStream,
    RequiredStream,
    collect,
    merge_deltas,
    parse_calls,
    plan_tools,
    render,
    tool_family,
)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY, **fields})


def grammar_acceptor(model_dir, grammar: str):
    """text -> whether the grammar accepts it whole, token by token in the default tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lltok = llguidance.hf.from_tokenizer(tokenizer)

    def accepts(text: str) -> bool:
        matcher = llguidance.LLMatcher(lltok, grammar)
        ok = all(matcher.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and matcher.is_accepting()
    return accepts


def feed_in_pieces(stream, text: str, size: int) -> tuple[str, list]:
    content, deltas = "", []
    for i in range(0, len(text), size):
        c, d = stream.feed(text[i:i + size])
        content, deltas = content + c, deltas + d
    c, d = stream.finish()
    return content + c, deltas + d


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),  # duplicate names
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "no-such-type"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400_naming_the_field(fields, param):
    with pytest.raises(InvalidRequest) as err:
        plan_tools(request(**fields))
    assert err.value.param == param


def test_no_tools_or_choice_none_plans_nothing():
    assert plan_tools(request()) is None
    assert plan_tools(request(tools=[WEATHER], tool_choice="none")) is None
    assert plan_tools(request(tools=[WEATHER])).mode == "auto"


@pytest.mark.parametrize("message", [
    {"role": "tool", "content": "x"},  # no tool_call_id
    {"role": "user", "content": None},
    {"role": "user", "content": "x", "tool_calls": HISTORY[1]["tool_calls"]},
])
def test_malformed_messages_are_refused(message):
    with pytest.raises(ValueError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [message]})


def test_smollm2_prompt_puts_tools_in_the_system_turn_and_history_in_its_tags(default_tokenizer):
    req = request(tools=[WEATHER], messages=[{"role": "system", "content": "Be brief."}, *HISTORY])
    assert tool_family(default_tokenizer.chat_template) == "smollm2"
    convo, template_tools = render(req.messages, req.tools, "smollm2")
    assert template_tools is None
    text = default_tokenizer.apply_chat_template(convo, add_generation_prompt=True, tokenize=False)
    assert text.count("<|im_start|>system") == 1 and "<tools>[{" in text and "Be brief." in text
    assert '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n]</tool_call>' in text
    assert "<tool_response>\nsunny, 21C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


NATIVE_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}:"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}\n{% endfor %}")


def test_a_template_that_takes_tools_gets_them_and_the_calls_as_mappings(default_tokenizer):
    assert tool_family(NATIVE_TEMPLATE) == "hermes"
    assert tool_family("{{ '<|python_tag|>' }} tools") == "llama3"
    assert tool_family(NATIVE_TEMPLATE, "llama3") == "llama3"
    req = request(tools=[WEATHER])
    convo, template_tools = render(req.messages, req.tools, "hermes")
    text = default_tokenizer.apply_chat_template(convo, tools=template_tools, chat_template=NATIVE_TEMPLATE,
                                                 tokenize=False)
    assert text.startswith('TOOLS:[{"type": "function", "function": {"name": "get_weather"')
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "tool:sunny, 21C" in text


@pytest.mark.parametrize("family, text, parsed", [
    ("smollm2", '<tool_call>[\n{"name": "get_weather", "arguments": {"city": "Rome"}},\n'
                '{"name": "get_time", "arguments": {"zone": "UTC"}}\n]</tool_call>',
     ("", [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "UTC"}')])),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>\nOne moment.',
     ("One moment.", [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "CET"}')])),
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Ro', None),  # cut: not a call
    ("hermes", '<tool_call>{"name": ["get_weather"], "arguments": {}}</tool_call>', None),  # a name must be text
    ("hermes", "<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", None),  # past the recursion limit
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
               '{"name": "get_time", "parameters": {"zone": "UTC"}}',
     ("", [("get_weather", '{"city": "Rome"}'), ("get_time", '{"zone": "UTC"}')])),
    ("llama3", '{"name": "rm_rf", "parameters": {}}', None),  # not one of the tools
    ("llama3", "The weather is fine.", None),
    ("smollm2", "<tool_call>[]</tool_call>", ("", [])),  # "no call needed": no call, and no tags shown
])
def test_each_family_parser_reads_its_calls_and_nothing_else(family, text, parsed):
    assert parse_calls(text, family, {"get_weather", "get_time"}) == parsed


@pytest.mark.parametrize("size", [1, 2, 5, 1000])
def test_required_output_streams_as_openai_does_in_any_piece_size(size):
    text = '[{"name":"get_weather","arguments":{"city":"a}\\"b{"}},{"name":"get_time","arguments":{"zone":"UTC"}}]'
    content, deltas = feed_in_pieces(RequiredStream(parallel=True), text, size)
    assert content == ""
    heads = [d for d in deltas if d.id is not None]
    assert [(d.index, d.type, d.function.name, d.function.arguments) for d in heads] == [
        (0, "function", "get_weather", ""), (1, "function", "get_time", "")]
    assert all(d.id is None and d.function.name is None for d in deltas if d not in heads)  # then fragments
    calls = collect(deltas)
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": 'a}"b{'}, {"zone": "UTC"}]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)


def test_one_required_call_without_parallel_calls_and_a_named_one():
    _, deltas = feed_in_pieces(RequiredStream(parallel=False), '{"name":"get_time","arguments":{"zone":"CET"}}', 3)
    assert [(c.function.name, c.function.arguments) for c in collect(deltas)] == [("get_time", '{"zone":"CET"}')]
    _, deltas = feed_in_pieces(NamedStream("get_weather"), '{"city":"Oslo"}', 4)
    assert deltas[0].function.name == "get_weather" and len(deltas) == 5
    assert [(c.function.name, c.function.arguments) for c in collect(deltas)] == [("get_weather", '{"city":"Oslo"}')]


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_auto_streams_content_then_holds_a_call_to_parse_it(size):
    names = {"get_weather"}
    text = 'Let me check. <tool_call>[{"name": "get_weather", "arguments": {"city": "Rome"}}]</tool_call>'
    content, deltas = feed_in_pieces(AutoStream("smollm2", names, parallel=True), text, size)
    assert content == "Let me check. "
    assert [(c.function.name, c.function.arguments) for c in collect(deltas)] == [("get_weather", '{"city": "Rome"}')]
    # text that only looks like the start of a tag, or a call of an unknown tool, is content as written
    for plain in ("a < b and <tool_ is not a tag", '<tool_call>[{"name": "other", "arguments": {}}]</tool_call>'):
        assert feed_in_pieces(AutoStream("smollm2", names, parallel=True), plain, size) == (plain, [])
    content, deltas = feed_in_pieces(AutoStream("smollm2", names, parallel=True),
                                     text + " It is sunny there. <tool_call>[]</tool_call>", size)
    assert content == "Let me check. It is sunny there." and len(collect(deltas)) == 1
    content, deltas = feed_in_pieces(AutoStream("llama3", names, parallel=False),
                                     '{"name": "get_weather", "parameters": {"city": "A"}}; '
                                     '{"name": "get_weather", "parameters": {"city": "B"}}', size)
    assert content == "" and [c.function.arguments for c in collect(deltas)] == ['{"city": "A"}']


@pytest.mark.parametrize("choice, parallel, good, bad", [
    ({"type": "function", "function": {"name": "get_time"}}, None, '{"zone":"UTC"}', '{"zone":"PST"}'),
    ("required", False, '{"name":"get_weather","arguments":{"city":"Oslo"}}',
     '{"name":"get_weather","arguments":{"town":"Oslo"}}'),
    ("required", None, '[{"name":"get_time","arguments":{"zone":"CET"}},{"name":"get_weather","arguments":'
                       '{"city":"x"}}]', '[]'),
])
def test_required_and_named_grammars_accept_valid_calls_only(default_model_dir, choice, parallel, good, bad):

    plan = plan_tools(request(tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=parallel))
    accepts = grammar_acceptor(default_model_dir, plan.grammar)
    assert accepts(good) and not accepts(bad)


def test_stream_deltas_are_one_per_call_per_chunk_without_nulls():
    """The openai SDK's stream helper copies every key of a delta and (older versions) appends a second delta of
    one index as a new call: a chunk carries each call once, and a fragment carries no null id/type/name."""
    _, deltas = NamedStream("get_time").feed('{"zone":')
    merged = merge_deltas(deltas)
    assert len(deltas) == 2 and len(merged) == 1
    assert merged[0].function.name == "get_time" and merged[0].function.arguments == '{"zone":'
    _, more = NamedStream("get_time").feed("x")
    assert json.loads(more[1].model_dump_json()) == {"index": 0, "function": {"arguments": "x"}}


def test_required_choice_resolves_each_tools_own_definitions(default_model_dir):
    """pydantic_function_tool-style parameters ($defs + $ref) keep resolving inside the combined schema."""

    def tool(name: str, item: str) -> dict:
        return {"type": "function", "function": {"name": name, "parameters": {
            "$defs": {"Item": {"type": "object", "properties": {item: {"type": "integer"}}, "required": [item],
                               "additionalProperties": False}},
            "type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
            "additionalProperties": False}}}

    plan = plan_tools(request(tools=[tool("a", "x"), tool("b", "y")], tool_choice="required",
                              parallel_tool_calls=False))
    accepts = grammar_acceptor(default_model_dir, plan.grammar)

    assert accepts('{"name":"a","arguments":{"item":{"x":1}}}') and accepts('{"name":"b","arguments":{"item":{"y":2}}}')
    assert not accepts('{"name":"a","arguments":{"item":{"y":1}}}')  # a's Item, not b's


def test_a_template_that_refuses_the_conversation_is_a_400(default_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    tokenizer.chat_template = "{{ raise_exception('only one tool call per turn') }}"
    with pytest.raises(InvalidRequest, match="only one tool call per turn") as err:
        PromptEncoder(tokenizer, "m", 256).encode_chat(request().messages, 4)
    assert err.value.param == "messages"


def test_an_sdk_message_sent_back_as_history_is_accepted():
    """model_dump() of the openai SDK's ChatCompletionMessage, as some clients append it."""
    echoed = {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
              "function_call": None, "tool_calls": HISTORY[1]["tool_calls"]}
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [HISTORY[0], echoed, HISTORY[2]]})
    assert req.messages[1].tool_calls[0].function.name == "get_weather"

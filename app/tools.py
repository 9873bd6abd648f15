"""Tool calling: OpenAI's ``tools`` / ``tool_choice`` rendered into the prompt and read back from the output.

Three choices, three ways (as vLLM does):
- ``required`` and a named function decode under a grammar (app/structured.py): a named function's output *is*
  its arguments, valid against the function's schema; ``required`` is a compact JSON list (an object when
  ``parallel_tool_calls`` is false) of ``{"name": ..., "arguments": {...}}``, one of the tools each.
- ``auto`` lets the model write its own tool-call format, which a parser per model family reads: SmolLM2's
  ``<tool_call>[...]</tool_call>`` list, Qwen2.5 / Hermes ``<tool_call>{...}</tool_call>`` tags, Llama 3.x's
  bare ``{"name": ..., "parameters": ...}``. Output that does not parse as calls of the given tools is content,
  as the model wrote it (no repair).
- ``none`` leaves the tools out of the prompt.

Prompts: a chat template that takes ``tools`` (Qwen2.5, Llama 3.1+) renders them and the history's calls
itself; for one that does not (SmolLM2's ChatML) the tools go into the system turn as SmolLM2 was trained to
see them, calls back into ``<tool_call>`` text and tool results into ``<tool_response>`` user turns.
Streams send each call as OpenAI does: id, type and name first, then the arguments in fragments.
"""
from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from llmaas.app.errors import InvalidRequest
from llmaas.app.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    Tool,
    ToolCall,
    new_call_id,
)
from llmaas.app.structured import ANY_JSON_OBJECT, grammar_for_schema

ToolFamily = Literal["smollm2", "hermes", "llama3"]
ToolFormat = Literal["auto", "smollm2", "hermes", "llama3"]  # the operator's setting; auto reads the chat template

SMOLLM2_TOOLS = "You have access to the following tools:\n<tools>{tools}</tools>"
SMOLLM2_SYSTEM = (  # how SmolLM2 was taught to call tools (its model card); only for auto: a grammar needs no
    # instructions on the shape, and they cost ~200 prompt tokens
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n"
    f"{SMOLLM2_TOOLS}\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call is "
    "needed, please make the tool calls an empty list '[]'.\n"
    '<tool_call>[\n{{"name": "func_name1", "arguments": {{"argument1": "value1", "argument2": "value2"}}}},\n'
    "(more tool calls as required)\n]</tool_call>")


def tool_family(chat_template: str | None, override: ToolFormat = "auto") -> ToolFamily:
    """The model's tool-call format: the operator's choice, else read from its chat template."""
    if override != "auto":
        return override  # type: ignore[return-value]
    template = chat_template or ""
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    if "tools" in template:  # a template that renders tools itself: Qwen2.5, Hermes and their kin use the tags
        return "hermes"
    return "smollm2"


def _arguments_value(arguments: str) -> Any:
    """A history call's arguments as templates expect them (a mapping), or the text if it is not JSON."""
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return arguments


def _tools_json(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude_none=True) for t in tools]


def render(messages: Sequence[ChatMessage], tools: Sequence[Tool] | None, family: ToolFamily,
           instruct: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(the conversation as the chat template takes it, the ``tools`` argument for the template or None).
    ``instruct``: tell the model how to write a call (tool_choice auto), not only which tools there are."""
    native = family != "smollm2"
    convo: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        text = m.text()
        if m.tool_calls and native:
            convo.append({"role": "assistant", "content": text, "tool_calls": [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
                for c in m.tool_calls]})
        elif m.tool_calls:
            calls = ",\n".join(json.dumps({"name": c.function.name,
                                           "arguments": _arguments_value(c.function.arguments)})
                               for c in m.tool_calls)
            convo.append({"role": "assistant", "content": f"{text}\n" * bool(text) + f"<tool_call>[\n{calls}\n]"
                                                                                     "</tool_call>"})
        elif role == "tool" and not native:
            convo.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        elif role == "tool":
            convo.append({"role": "tool", "content": text, "tool_call_id": m.tool_call_id})
        else:
            convo.append({"role": role, "content": text})
    if not tools:
        return convo, None
    if native:
        return convo, _tools_json(tools)
    system = (SMOLLM2_SYSTEM if instruct else SMOLLM2_TOOLS).format(tools=json.dumps(_tools_json(tools)))
    if convo and convo[0]["role"] == "system":  # the operator's / user's own system text follows the tools'
        system += "\n" + convo.pop(0)["content"]
    return [{"role": "system", "content": system}, *convo], None


# ----- what the request asks for: checked before any model time -----
@dataclass(frozen=True, slots=True)
class ToolPlan:
    mode: Literal["auto", "required", "named"]
    tools: tuple[Tool, ...]  # all the request's tools: the prompt shows them all
    grammar: str | None  # required / named: the llguidance grammar the output follows
    parallel: bool
    name: str | None = None  # named: the function to call

    def names(self) -> set[str]:
        return {t.function.name for t in self.tools}


DEFS = ("$defs", "definitions")


def _moved_refs(value: Any, prefix: str) -> Any:
    """``value`` with every local ``$ref`` into its definitions renamed under ``prefix``."""
    if isinstance(value, dict):
        out = {k: _moved_refs(v, prefix) for k, v in value.items()}
        ref = out.get("$ref")
        if isinstance(ref, str):
            for key in DEFS:
                if ref.startswith(f"#/{key}/"):
                    out["$ref"] = f"#/$defs/{prefix}{ref[len(key) + 3:]}"
        return out
    if isinstance(value, list):
        return [_moved_refs(v, prefix) for v in value]
    return value


def _required_schema(tools: Sequence[Tool], parallel: bool) -> dict[str, Any]:
    """Calls of any of ``tools``: each call's arguments follow its function's schema, whose definitions
    (``$defs``: pydantic's nested models) move to the root, renamed per tool, so their ``$ref``s still resolve."""
    calls, defs = [], {}
    for i, tool in enumerate(tools):
        params = _moved_refs(tool.function.parameters or ANY_JSON_OBJECT, f"t{i}_")
        for key in DEFS:
            defs.update({f"t{i}_{name}": d for name, d in (params.pop(key, None) or {}).items()})
        calls.append({"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": tool.function.name}, "arguments": params}})
    schema: dict[str, Any] = {"anyOf": calls}
    if parallel:
        schema = {"type": "array", "minItems": 1, "items": schema}
    return {**schema, "$defs": defs} if defs else schema


def plan_tools(req: ChatCompletionRequest) -> ToolPlan | None:
    """The request's tool use (None: no tools in play), or a 400 naming what is wrong. Compiling a grammar is CPU
    work: call this off the event loop."""
    mode = req.tool_mode()
    if req.tool_choice not in (None, "none") and not req.tools:
        raise InvalidRequest("tool_choice is only allowed when tools are specified", param="tool_choice")
    if mode == "none":
        return None
    tools = tuple(req.tools or ())
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique", param="tools")
    if req.response_format is not None and req.response_format.type != "text":
        raise InvalidRequest("response_format json_object / json_schema cannot be combined with tools; set "
                             "tool_choice to 'none' or leave response_format out", param="response_format")
    parallel = req.parallel_tool_calls is not False
    if mode == "auto":
        return ToolPlan("auto", tools, None, parallel)
    if mode == "named":
        name = req.tool_choice.function.name  # type: ignore[union-attr]
        if name not in names:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools: {', '.join(names)}",
                                 param="tool_choice")
        chosen = tools[names.index(name)]
        schema = chosen.function.parameters or ANY_JSON_OBJECT
        return ToolPlan("named", tools, grammar_for_schema(schema, "tools"), parallel, name)
    return ToolPlan("required", tools, grammar_for_schema(_required_schema(tools, parallel), "tools"), parallel)


# ----- reading calls back out of the output, as it streams -----
class CallStream(Protocol):
    """One choice's output split into content and tool-call deltas, as it grows."""

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]: ...
    def finish(self) -> tuple[str, list[DeltaToolCall]]: ...


def _header(index: int, name: str, arguments: str = "") -> DeltaToolCall:
    return DeltaToolCall(index=index, id=new_call_id(), type="function",
                         function=DeltaFunction(name=name, arguments=arguments))


def _fragment(index: int, arguments: str) -> DeltaToolCall:
    return DeltaToolCall(index=index, function=DeltaFunction(arguments=arguments))


class NamedStream:
    """tool_choice names a function: the whole output is its arguments."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = False

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        deltas = [] if self.started else [_header(0, self.name)]
        self.started = True
        if text:
            deltas.append(_fragment(0, text))
        return "", deltas

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        return self.feed("")


class RequiredStream:
    """tool_choice required: the grammar's compact ``[{"name":"f","arguments":{...}},...]`` (or one object), cut
    into calls as it comes: each call's header as soon as its name is complete, then its arguments' text."""

    HEADER = re.compile(r'\{"name":"([^"\\]*)","arguments":')

    def __init__(self, parallel: bool) -> None:
        self.base = 1 if parallel else 0  # the depth calls open at: inside the list, or at the top
        self.buf = ""
        self.pos = 0
        self.depth = 0
        self.index = -1
        self.in_args = self.in_string = self.escaped = False

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        self.buf += text
        deltas: list[DeltaToolCall] = []
        args_from = self.pos
        while self.pos < len(self.buf):
            c = self.buf[self.pos]
            if not self.in_args:
                if c == "{" and self.depth == self.base:
                    header = self.HEADER.match(self.buf, self.pos)
                    if header is None:
                        break  # the name is still coming
                    self.index += 1
                    deltas.append(_header(self.index, header.group(1)))
                    self.pos, self.depth, self.in_args = header.end(), self.base + 1, True
                    args_from = self.pos
                    continue
                self.depth += (c == "[") - (c == "]")
            elif self.in_string:
                self.in_string = self.escaped or c != '"'
                self.escaped = not self.escaped and c == "\\"
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == self.base:  # the call object's own closing brace: its arguments are whole
                    if self.pos > args_from:
                        deltas.append(_fragment(self.index, self.buf[args_from:self.pos]))
                    self.in_args = False
            self.pos += 1
        if self.in_args and self.pos > args_from:
            deltas.append(_fragment(self.index, self.buf[args_from:self.pos]))
        return "", deltas

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        return "", []


class AutoStream:
    """tool_choice auto: content streams until the model starts a call in its family's format; from there the
    text is held and parsed at the end: calls of the given tools, or (if it is not that) content after all."""

    TAG = "<tool_call>"

    def __init__(self, family: ToolFamily, names: set[str], parallel: bool) -> None:
        self.family = family
        self.names = names
        self.parallel = parallel
        self.held = ""  # text that may be (or is) a call
        self.seen_text = False
        self.calling = False

    def feed(self, text: str) -> tuple[str, list[DeltaToolCall]]:
        if self.calling:
            self.held += text
            return "", []
        self.held += text
        if self.family == "llama3":  # a Llama 3 call is the whole answer: a JSON object from the first character
            if not self.seen_text and self.held.strip():
                self.seen_text = True
                self.calling = self.held.lstrip().startswith("{")
            if self.calling or not self.seen_text:
                return "", []
            out, self.held = self.held, ""
            return out, []
        at = self.held.find(self.TAG)
        if at >= 0:
            out, self.held, self.calling = self.held[:at], self.held[at:], True
            return out, []
        keep = next((k for k in range(min(len(self.TAG) - 1, len(self.held)), 0, -1)
                     if self.held.endswith(self.TAG[:k])), 0)  # a tail that may be the tag's start
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out, []

    def finish(self) -> tuple[str, list[DeltaToolCall]]:
        held, self.held = self.held, ""
        parsed = parse_calls(held, self.family, self.names) if self.calling else None
        if parsed is None:
            return held, []
        content, calls = parsed
        if not self.parallel:
            calls = calls[:1]
        return content, [_header(i, name, arguments) for i, (name, arguments) in enumerate(calls)]


def _as_call(obj: Any, names: set[str]) -> tuple[str, str] | None:
    """{"name": ..., "arguments" | "parameters": {...}} of a known tool as (name, arguments JSON)."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def _json_values(text: str) -> list[Any] | None:
    """Every JSON value in ``text``, separated by whitespace or ';' (None if anything else is there)."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and (text[i].isspace() or text[i] == ";"):
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's recursion limit
            return None
        values.append(value)


TAGGED = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", flags=re.S)


def parse_calls(text: str, family: ToolFamily, names: set[str]) -> tuple[str, list[tuple[str, str]]] | None:
    """(the text around the calls, the (name, arguments JSON) calls) ``text`` makes in the family's format; None
    if it holds no call block or one that is not calls of ``names``. An empty list (SmolLM2's "no call needed")
    is no call."""
    if family == "llama3":  # the whole answer is the calls
        values, content = _json_values(text.replace("<|python_tag|>", "")), ""
        if not values:
            return None
    else:  # <tool_call>...</tool_call> blocks holding an object (Hermes) or a list of them (SmolLM2)
        blocks = TAGGED.findall(text)
        if not blocks:
            return None
        values, content = [], TAGGED.sub("", text).strip()
        for block in blocks:
            found = _json_values(block)
            if found is None:
                return None
            values += [v for value in found for v in (value if isinstance(value, list) else [value])]
    calls = [_as_call(v, names) for v in values]
    if any(c is None for c in calls):
        return None
    return content, calls  # type: ignore[return-value]


def call_stream(plan: ToolPlan, family: ToolFamily) -> CallStream:
    if plan.mode == "named":
        return NamedStream(plan.name or "")
    if plan.mode == "required":
        return RequiredStream(plan.parallel)
    # Llama 3.x's templates refuse an assistant turn of several calls: one call per answer there
    return AutoStream(family, plan.names(), plan.parallel and family != "llama3")


def read_calls(stream: CallStream, text: str, last: bool) -> tuple[str, list[DeltaToolCall]]:
    """Feeds ``text`` (and, on the choice's ``last`` text, finishes): the content and the call deltas to send,
    one delta per call."""
    content, deltas = stream.feed(text)
    if last:
        rest, more = stream.finish()
        content, deltas = content + rest, deltas + more
    return content, merge_deltas(deltas)


def merge_deltas(deltas: Sequence[DeltaToolCall]) -> list[DeltaToolCall]:
    """One delta per call: a call's header and the fragments after it in one chunk, joined."""
    out: list[DeltaToolCall] = []
    for d in deltas:
        if out and out[-1].index == d.index and d.id is None:
            last = out[-1].function
            out[-1] = out[-1].model_copy(update={"function": DeltaFunction(
                name=last.name, arguments=(last.arguments or "") + (d.function.arguments or ""))})
        else:
            out.append(d)
    return out


def collect(deltas: Sequence[DeltaToolCall]) -> list[ToolCall]:
    """Streamed call deltas merged into whole calls (a non-streaming response's ``tool_calls``)."""
    calls: list[ToolCall] = []
    for d in deltas:
        if d.id is not None:
            calls.append(ToolCall(id=d.id, function=FunctionCall(name=d.function.name or "", arguments="")))
        if d.function.arguments:
            calls[d.index].function.arguments += d.function.arguments
    return calls

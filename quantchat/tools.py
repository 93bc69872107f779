"""Tool calls: the model's own format, read from its chat template, both ways.

Tools reach the model through its chat template (which takes a `tools` variable); the model answers with a call
in the format it was trained on. Three formats are known, each recognised by what the template writes, never by
the model's name:
  hermes   <tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>     Qwen 2.5/3, Hermes, many fine-tunes
  llama3   {"name": "f", "parameters": {...}}  as the whole answer          Llama 3.1-3.3
  mistral  [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]            Mistral's v3 tokenizer models
Each format turns a request's tools into a grammar (constraints.Constraint) for tool_choice "required" or a named
function, and for "auto" where the format has a marker that opens a call, so every call parses and validates; and
each reads calls back out of the answer, also as it streams (ToolCallStream).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from .constraints import Constraint, json_value, marker
from .errors import UserError


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str   # JSON text, as OpenAI's API carries it
    id: str = field(default_factory=lambda: "call_" + uuid.uuid4().hex[:24])

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def display(self) -> str:
        """One line for the web UI and the terminal (the call is shown, never run there)."""
        return f"tool call: {self.name}({self.arguments})"


@dataclass(frozen=True)
class Tools:
    """A request's tools: OpenAI's function specs ({"name", "description", "parameters"}), which of them the model
    must call ("auto", "none", "required", or a function's name), and whether it may call several at once."""
    functions: tuple[dict, ...]
    choice: str = "auto"
    parallel: bool = True

    def specs(self) -> list[dict]:
        """The functions in OpenAI's shape ({"type": "function", "function": ...}), as chat templates expect."""
        return [{"type": "function", "function": f} for f in self.functions]

    def offered(self) -> list[dict] | None:
        """What the chat template's `tools` variable gets; None for 'none'."""
        return None if self.choice == "none" or not self.functions else self.specs()

    def request(self) -> dict[str, Any]:
        """The OpenAI request fields that offer these tools (sent on to a remote engine)."""
        choice = self.choice if self.choice in ("auto", "none", "required") else \
            {"type": "function", "function": {"name": self.choice}}
        return {"tools": self.specs(), "tool_choice": choice,
                "parallel_tool_calls": self.parallel}

    def required(self) -> bool:
        return self.choice not in ("auto", "none")

    def several(self) -> bool:
        """Whether one answer may hold several calls (a named tool_choice asks for one call of it)."""
        return self.parallel and self.choice in ("auto", "required")

    def names(self) -> set[str]:
        return {f["name"] for f in self.functions} if self.offered() else set()

    def callable(self) -> list[dict]:
        chosen = [f for f in self.functions if self.choice in ("auto", "required", f["name"])]
        if not chosen:
            raise UserError(f"tool_choice names {self.choice!r}, which is not among the tools")
        return chosen


def _call_schema(function: dict, arguments_key: str) -> dict:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}


def _any_call(functions: list[dict], arguments_key: str) -> dict:
    calls = [_call_schema(f, arguments_key) for f in functions]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _object_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call_from(value: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters")))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def _calls_grammar(calls: str, tools: Tools, rules: str = "") -> str:
    """The answer's grammar: the calls alone (a call is required), or free text with the calls after it, where the
    grammar takes over once the model opens one (tool_choice 'auto')."""
    if tools.required():
        return f"start: {calls}\n{rules}"
    return f'%llguidance {{}}\nstart: TEXT | TEXT {calls}\n{rules}TEXT: /(.|\\n)*/\n'


class ToolFormat:
    """How one family of models writes tool calls. `opens` marks the start of a call (or of the calls); `closes` ends
    one call ("" : the calls run to the end of the answer); `whole_answer`: a call is only ever the whole answer."""
    name = ""
    opens = ""
    closes = ""
    whole_answer = False

    def constraint(self, tools: Tools) -> Constraint | None:
        """The grammar for this request's answer, or None where the answer is free (tool_choice 'auto' in a format
        with no marker that opens a call: its calls are still read, just not enforced)."""
        raise NotImplementedError

    def read(self, body: str) -> list[ToolCall] | None:
        """The calls in the text between `opens` and `closes` (or the answer's end); None if it is not a call."""
        raise NotImplementedError


class Hermes(ToolFormat):
    name, opens, closes = "hermes", "<tool_call>", "</tool_call>"

    def constraint(self, tools: Tools) -> Constraint | None:
        call = f'{marker(0)} "\\n" {json_value(_any_call(tools.callable(), "arguments"))} "\\n" {marker(1)}'
        calls = 'call ("\\n" call)*' if tools.several() else "call"
        return Constraint(_calls_grammar(calls, tools, f"call: {call}\n"), "the tool call", (self.opens, self.closes))

    def read(self, body: str) -> list[ToolCall] | None:
        call = _call_from(_object_or_none(body.strip()), "arguments")
        return [call] if call else None


class Llama3(ToolFormat):
    name, whole_answer = "llama3", True

    def constraint(self, tools: Tools) -> Constraint | None:
        if not tools.required():
            return None
        return Constraint(f"start: {json_value(_any_call(tools.callable(), 'parameters'))}\n", "the tool call")

    def read(self, body: str) -> list[ToolCall] | None:
        text = body.strip().removeprefix("<|python_tag|>").strip()
        calls = [_call_from(_object_or_none(part), "parameters") for part in text.split(";")] if text else [None]
        return calls if all(calls) else None


class Mistral(ToolFormat):
    name, opens = "mistral", "[TOOL_CALLS]"

    def constraint(self, tools: Tools) -> Constraint | None:
        array = {"type": "array", "items": _any_call(tools.callable(), "arguments"), "minItems": 1}
        if not tools.several():
            array["maxItems"] = 1
        return Constraint(_calls_grammar(f"{marker(0)} {json_value(array)}", tools), "the tool call", (self.opens,))

    def read(self, body: str) -> list[ToolCall] | None:
        value = _object_or_none(body.strip())
        calls = [_call_from(v, "arguments") for v in value] if isinstance(value, list) and value else [None]
        return calls if all(calls) else None


def tool_format(template: str | None) -> ToolFormat | None:
    """The tool-call format a chat template writes, from its text; None if it renders no tools or none we read."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return Hermes()
    if "[TOOL_CALLS]" in template:
        return Mistral()
    if "<|start_header_id|>" in template and ('"parameters"' in template or "<|python_tag|>" in template):
        return Llama3()
    return None


class ToolCallStream:
    """Splits a streamed answer into text and tool calls: feed() takes each text delta and returns what can be
    handed out now (text, and each call once it is complete); close() returns the rest. Text that may start a call
    is held back until it is known to be one; a 'call' that does not parse is handed out as text.

    `names`: the functions offered. An answer that is nothing but one JSON call of one of them ({"name": ...,
    "arguments": {...}}, bare or in a ```json block) is read as a call too: small models often drop their format's
    markers, and the function's name must match for it to count."""

    ANSWER_OPENERS = ("{", "```json", "<|python_tag|>")

    def __init__(self, fmt: ToolFormat, names: set[str] | None = None):
        self.fmt = fmt
        self.names = names or set()
        self.buffer = ""         # text not yet handed out
        self.in_call = False     # the buffer starts with fmt.opens
        self.started = False     # text or a call handed out: a whole-answer call is no longer possible
        self.after_call = False  # whitespace after a call is dropped, not handed out

    def feed(self, delta: str) -> list[str | ToolCall]:
        self.buffer += delta
        out: list[str | ToolCall] = []
        if not self.started and (self.fmt.whole_answer or self.names) and self._may_be_whole_call():
            return out           # wait for the whole answer
        if self.fmt.whole_answer:
            self._text(out, self.buffer)
            self.buffer = ""
            return out
        while self.buffer:
            if not self.in_call:
                at = self.buffer.find(self.fmt.opens)
                if at < 0:  # hand out all but a tail that could begin the marker, and the whitespace before it
                    keep = _partial_suffix(self.buffer, self.fmt.opens)
                    text = self.buffer[:len(self.buffer) - keep].rstrip()
                    self._text(out, text)
                    self.buffer = self.buffer[len(text):]
                    return out
                text = self.buffer[:at].rstrip()  # the whitespace before a call goes with it (the format's)
                self._text(out, text)
                self.buffer, self.in_call = self.buffer[len(text):], True
            if not self.fmt.closes:
                return out        # the calls run to the end of the answer
            end = self.buffer.find(self.fmt.closes)
            if end < 0:
                return out
            end += len(self.fmt.closes)
            self._calls(out, self.buffer[:end], self.fmt.read(self._body(self.buffer[:end])))
            self.buffer, self.in_call = self.buffer[end:], False
        return out

    def close(self) -> list[str | ToolCall]:
        out: list[str | ToolCall] = []
        if not self.started and self._may_be_whole_call():
            text = self.buffer.strip().removeprefix("```json").removesuffix("```").strip()
            calls = self.fmt.read(text) if self.fmt.whole_answer else None
            if calls is None and self.names:
                call = _call_from(_object_or_none(text), "arguments")
                calls = [call] if call and call.name in self.names else None
            self._calls(out, self.buffer, calls)
        elif self.in_call:
            self._calls(out, self.buffer, self.fmt.read(self._body(self.buffer)))
        elif not self.after_call or self.buffer.strip():
            self._text(out, self.buffer)
        self.buffer = ""
        return out

    def _may_be_whole_call(self) -> bool:
        head = self.buffer.lstrip()
        return any(head.startswith(o) or o.startswith(head) for o in self.ANSWER_OPENERS)

    def _body(self, segment: str) -> str:
        body = segment.lstrip().removeprefix(self.fmt.opens)
        return body[:len(body) - len(self.fmt.closes)] if self.fmt.closes and body.endswith(self.fmt.closes) else body

    def _calls(self, out: list, segment: str, calls: list[ToolCall] | None) -> None:
        if calls is None:
            self._text(out, segment)
            return
        out.extend(calls)
        self.started = self.after_call = True

    def _text(self, out: list, text: str) -> None:
        if self.after_call and not text.strip():
            return  # the newlines between calls
        if text:
            out.append(text)
            self.started, self.after_call = True, False


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: a tool call's arguments as an object (OpenAI sends JSON text)."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                function = call.get("function", call)
                arguments = function.get("arguments", {})
                if isinstance(arguments, str):
                    arguments = _object_or_none(arguments)
                    arguments = arguments if isinstance(arguments, dict) else {}
                calls.append({**call, "function": {**function, "arguments": arguments}})
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


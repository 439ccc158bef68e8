"""Tool calling on local models: checking `tools`, the call syntax, tools in the prompt, and calls out of text.

One call syntax for every local model, the Hermes/Qwen one many small models were tuned on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

A chat template that knows tools (its source mentions `tools`) gets them as `tools=` and renders them its own
way; any other template (SmolLM2's) gets them in the system prompt, in Qwen2.5's words (`SYSTEM_TOOLS`), earlier
assistant calls as that syntax and `role: tool` results as a user turn of `<tool_response>` blocks. The decoder
is held to the syntax by a grammar (backends/constrained.py); `ToolCallParser` reads calls back, chunk by chunk.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from protocol.errors import BadRequest

__all__ = [
    "CALL_END",
    "CALL_OPEN",
    "SYSTEM_TOOLS",
    "ParsedCall",
    "Tool",
    "ToolCallParser",
    "ToolPlan",
    "call_prefix",
    "check_tools",
    "template_messages",
]

CALL_OPEN = "<tool_call>"
CALL_END = "}\n</tool_call>"  # closes the {"name": ..., "arguments": ...} wrapper, then the tag
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# the head of a call up to its arguments; the grammar writes exactly `call_prefix(name)`, this also reads
# the looser spacing a model writes by itself
_HEAD = re.compile(r'<tool_call>\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_HEAD_MAX = 256  # characters after <tool_call> within which a head must be complete, or it was text
_CUT_OPEN = len("<tool_")  # a cut-off `<tool_call>` this long or longer at the end was a call's start
SYSTEM_TOOLS = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def call_prefix(name: str) -> str:
    """What a call to `name` starts with, up to its arguments object."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    parameters: dict[str, Any]  # a JSON schema for the arguments object
    definition: dict[str, Any]  # the client's {"type": "function", "function": {...}}, for the prompt


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request's `tools` and `tool_choice` ask for.

    `choice`: "auto" (text or a call, the model decides), "required" (a call), "none" (text only; the
    definitions stay out of the prompt) or "named" (a call to `allowed[0]`). One call per turn at most:
    `parallel_tool_calls` is accepted and honoured as a single call (small models, free to go on, repeat the
    same call until max_tokens).
    """

    tools: tuple[Tool, ...]
    choice: str
    allowed: tuple[str, ...]

    @property
    def calls(self) -> bool:
        """Whether the model may call a tool at all."""
        return self.choice != "none"

    def spec(self) -> dict[str, Any]:
        """What the grammar needs, JSON-able: the callable tools' names and argument schemas, and the mode."""
        by_name = {tool.name: tool for tool in self.tools}
        return {"mode": "auto" if self.choice == "auto" else "required",
                "tools": [{"name": name, "parameters": by_name[name].parameters} for name in self.allowed]}


def check_tools(tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """Validate OpenAI's `tools` and `tool_choice` (400 naming the field) -> the plan, or None without tools."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise BadRequest("'tool_choice' is only allowed when 'tools' are specified.", param="tool_choice")
        return None
    checked: list[Tool] = []
    for i, entry in enumerate(tools):
        checked.append(_check_tool(entry, f"tools[{i}]"))
    names = [tool.name for tool in checked]
    if len(set(names)) != len(names):
        raise BadRequest("Tool names must be unique.", param="tools")
    choice, allowed = _check_choice(tool_choice, names)
    return ToolPlan(tuple(checked), choice, allowed)


def _check_tool(entry: Any, where: str) -> Tool:
    if not isinstance(entry, dict) or entry.get("type") != "function":
        raise BadRequest(f"'{where}' must be an object with 'type': 'function'.", param=where)
    function = entry.get("function")
    if not isinstance(function, dict):
        raise BadRequest(f"'{where}.function' must be an object.", param=f"{where}.function")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise BadRequest(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'.",
                         param=f"{where}.function.name")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise BadRequest(f"'{where}.function.description' must be a string.", param=f"{where}.function.description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'{where}.function.parameters' must be a JSON schema object.",
                         param=f"{where}.function.parameters")
    return Tool(name, parameters, {"type": "function", "function": function})


def _check_choice(tool_choice: Any, names: list[str]) -> tuple[str, tuple[str, ...]]:
    if tool_choice is None or tool_choice in ("auto", "required", "none"):
        return tool_choice or "auto", tuple(names)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise BadRequest(f"'tool_choice' names the function {name!r}, which is not in 'tools'.",
                             param="tool_choice")
        return "named", (name,)
    raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or "
                     "{'type': 'function', 'function': {'name': ...}}.", param="tool_choice")


# ---- the prompt -----------------------------------------------------------------------------------------


def template_messages(messages: list[dict[str, Any]], plan: ToolPlan | None, native: bool,
                      ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """Messages (as engine_requests made them: `tool_calls` [{id, name, arguments}], `tool_call_id`) ->
    (what the chat template gets, its `tools=` argument or None)."""
    offered = [tool.definition for tool in plan.tools] if plan is not None and plan.calls else []
    if native:
        return [_native(m) for m in messages], offered or None
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results share one user turn, as in Qwen2.5
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        elif message.get("tool_calls"):
            calls = "\n".join(f"{call_prefix(c['name'])}{c['arguments']}{CALL_END}" for c in message["tool_calls"])
            text = message["content"]
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    for message in out:
        message.pop("tool_results", None)
    if offered:
        listed = "\n".join(json.dumps(d, ensure_ascii=False) for d in offered)
        block = SYSTEM_TOOLS.format(tools=listed)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, None


def _native(message: dict[str, Any]) -> dict[str, Any]:
    # Hugging Face's message format for tool-aware templates: arguments as an object, results as role "tool"
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    if message.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": _loads(c["arguments"])}}
            for c in message["tool_calls"]
        ]
    return out


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # not JSON: the template gets the text as it is


# ---- reading calls back ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str = ""
    complete: bool = False


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally: `push` and `flush` return events

        ("content", text) | ("call", index) | ("arguments", index, text)

    where ("call", i) means `calls[i]` (id and name) has just started. Text that may still turn into a call
    (a partial `<tool_call>`, the `}` that may close the wrapper) is held back until the next piece tells.
    Whitespace after a call (the separator between calls) is not content. At the end, a call cut off before its
    head was complete (max_tokens) is dropped, never content; with `calls_only` (a grammar that writes a call
    from the first character: tool_choice required or named) so is any cut-off start of one.
    """

    __slots__ = ("_buf", "_calls_only", "_in_call", "calls", "content")

    def __init__(self, calls_only: bool = False) -> None:
        self._calls_only = calls_only
        self._buf = ""
        self._in_call = False
        self.calls: list[ParsedCall] = []
        self.content: list[str] = []

    def push(self, text: str) -> list[tuple]:
        self._buf += text
        events: list[tuple] = []
        while self._step(events, final=False):
            pass
        return events

    def flush(self) -> list[tuple]:
        events: list[tuple] = []
        while self._step(events, final=True):
            pass
        if self._buf:  # an unfinished call's arguments, or text that never became a call
            if self._in_call:
                hold = _close_hold(self._buf)  # a cut-off end of the call is not arguments (a lone } may be)
                self._arguments(events, self._buf[: len(self._buf) - hold] if hold > 1 else self._buf)
            else:
                self._text(events, self._buf)
            self._buf = ""
        return events

    def _step(self, events: list[tuple], final: bool) -> bool:
        """Consume what can be decided now; True if something changed and another pass may do more."""
        buf = self._buf
        if self._in_call:
            close = _close_at(buf)
            if close is not None:
                start, end = close
                self._arguments(events, buf[:start])
                self.calls[-1].complete = True
                self._buf, self._in_call = buf[end:], False
                return True
            hold = _close_hold(buf)
            self._arguments(events, buf[: len(buf) - hold])
            self._buf = buf[len(buf) - hold :]
            return False
        at = buf.find(CALL_OPEN)
        if at < 0:
            hold = _prefix_hold(buf, CALL_OPEN)
            # at the end, a call's opening cut off past the grammar's trigger (`<tool_`) is markup, not text
            cut_call = final and (hold >= _CUT_OPEN or (self._calls_only and hold > 0))
            keep = 0 if final and not cut_call else hold
            self._text(events, buf[: len(buf) - keep])
            self._buf = "" if final else buf[len(buf) - keep :]
            return False
        self._text(events, buf[:at])
        head = _HEAD.match(buf, at)
        if head is None:
            if len(buf) - at > len(CALL_OPEN) + _HEAD_MAX:  # never became a call: it was text
                self._text(events, buf[at:])
                self._buf = ""
            else:  # may still become a call; at the end, a call cut off before its name was complete: dropped
                self._buf = "" if final else buf[at:]
            return False
        name = json.loads(f'"{head[1]}"')
        self.calls.append(ParsedCall(f"call_{uuid.uuid4().hex[:24]}", name))
        events.append(("call", len(self.calls) - 1))
        self._buf, self._in_call = buf[head.end() :], True
        return True

    def _text(self, events: list[tuple], text: str) -> None:
        if not text or (self.calls and not text.strip()):
            return
        self.content.append(text)
        events.append(("content", text))

    def _arguments(self, events: list[tuple], text: str) -> None:
        if text:
            self.calls[-1].arguments += text
            events.append(("arguments", len(self.calls) - 1, text))


def _prefix_hold(text: str, marker: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _close_at(buf: str) -> tuple[int, int] | None:
    """Where the arguments end -> (start, end) of CALL_END. It cannot occur inside them: JSON strings hold no raw
    newline (a `}</tool_call>` inside a string value is just text)."""
    at = buf.find(CALL_END)
    return None if at < 0 else (at, at + len(CALL_END))


def _close_hold(buf: str) -> int:
    """How much of the tail may still be the start of CALL_END."""
    return _prefix_hold(buf, CALL_END)

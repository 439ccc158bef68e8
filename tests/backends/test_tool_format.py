"""backends/tool_format.py: `tools` checking, tools and past calls in the prompt, and calls read back from text
(whole or piece by piece)."""

from __future__ import annotations

import json

import pytest

from backends.tool_format import SYSTEM_TOOLS, ToolCallParser, call_prefix, check_tools, template_messages
from protocol.errors import BadRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = call_prefix("get_weather") + '{"city": "Paris"}' + "}\n</tool_call>"


def test_tool_choice_modes() -> None:
    assert check_tools(None, None) is None and check_tools([], "none") is None
    auto = check_tools([WEATHER, TIME], None)
    assert auto is not None and (auto.choice, auto.allowed) == ("auto", ("get_weather", "get_time"))
    assert auto.tools[1].parameters == {"type": "object", "properties": {}}  # no parameters: no arguments
    named = check_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named is not None and (named.choice, named.allowed) == ("named", ("get_time",))
    assert named.spec() == {"mode": "required", "tools": [{"name": "get_time", "parameters": auto.tools[1].parameters}]}
    none = check_tools([WEATHER], "none")
    assert none is not None and not none.calls and check_tools([WEATHER], "required").calls  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (None, "required", "tool_choice"),
        ([{"type": "function"}], None, "tools[0].function"),
        ([{"type": "retrieval"}], None, "tools[0]"),
        ([{"type": "function", "function": {"name": "has space"}}], None, "tools[0].function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], None, "tools[0].function.parameters"),
        ([TIME, TIME], None, "tools"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
        ([WEATHER], "always", "tool_choice"),
    ],
)
def test_bad_tools_are_400_naming_the_field(tools: list | None, choice: object, param: str) -> None:
    with pytest.raises(BadRequest) as err:
        check_tools(tools, choice)
    assert err.value.param == param


def test_prompt_without_template_support() -> None:
    plan = check_tools([WEATHER], "auto")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "b", "name": "get_weather", "arguments": '{"city": "Rome"}'}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "a"},
        {"role": "tool", "content": "rainy", "tool_call_id": "b"},
    ]
    messages, tools = template_messages(history, plan, native=False)
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": CALL + "\n" + CALL.replace("Paris", "Rome")}
    # the results of one turn's calls share one user turn, as Qwen2.5's template renders them
    results = "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
    assert messages[3] == {"role": "user", "content": results}
    assert len(messages) == 4
    # tool_choice none: the definitions stay out, past calls are still shown
    quiet, _ = template_messages(history[1:], check_tools([WEATHER], "none"), native=False)
    assert quiet[0]["role"] == "user" and CALL in quiet[1]["content"]
    alone, _ = template_messages([{"role": "user", "content": "hi"}], plan, native=False)
    assert alone[0] == {"role": "system", "content": SYSTEM_TOOLS.format(tools=json.dumps(WEATHER))}


def test_prompt_for_a_template_that_knows_tools() -> None:
    history = [{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "name": "get_weather",
                                                                     "arguments": '{"city": "Paris"}'}]},
               {"role": "tool", "content": "sunny", "tool_call_id": "a"}]
    messages, tools = template_messages(history, check_tools([WEATHER], None), native=True)
    assert tools == [WEATHER]
    assert messages[0]["tool_calls"] == [{"id": "a", "type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[1] == history[1]


def parse(pieces: list[str]) -> tuple[ToolCallParser, list[tuple]]:
    parser = ToolCallParser()
    events = [e for piece in pieces for e in parser.push(piece)]
    return parser, events + parser.flush()


def streamed(events: list[tuple]) -> tuple[str, dict[int, str]]:
    content = "".join(e[1] for e in events if e[0] == "content")
    arguments: dict[int, str] = {}
    for e in events:
        if e[0] == "call":
            arguments[e[1]] = ""
        elif e[0] == "arguments":
            arguments[e[1]] += e[2]
    return content, arguments


@pytest.mark.parametrize(
    "text",
    [
        CALL,
        "Let me check.\n" + CALL,
        CALL + "\n" + CALL.replace("Paris", "Rome") + "\n",
        call_prefix("get_weather") + '{"place": {"city": "a}b", "n": [1, {"x": 2}]}}' + "}\n</tool_call>",
        call_prefix("get_weather") + '{"city": "})}</tool_call> is a"}' + "}\n</tool_call>",  # seen sampled
        "plain text with a < sign and <tool_ but no call",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off by max_tokens
    ],
)
def test_any_split_reads_the_same_as_the_whole(text: str) -> None:
    whole, events = parse([text])
    expected = (whole.content, [(c.name, c.arguments, c.complete) for c in whole.calls])
    assert streamed(events) == ("".join(whole.content), {i: c.arguments for i, c in enumerate(whole.calls)})
    for cut in range(1, len(text)):
        parser, events = parse([text[:cut], text[cut:]])
        assert ("".join(parser.content), [(c.name, c.arguments, c.complete) for c in parser.calls]) == (
            "".join(expected[0]), expected[1]), cut
        assert streamed(events)[1] == {i: c.arguments for i, c in enumerate(parser.calls)}
    one_char, _ = parse(list(text))
    assert [(c.name, c.arguments) for c in one_char.calls] == [(c.name, c.arguments) for c in whole.calls]


def test_calls_and_content() -> None:
    parser, _ = parse(["Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Rome")])
    assert "".join(parser.content) == "Let me check.\n"
    assert [(c.name, c.arguments, c.complete) for c in parser.calls] == [
        ("get_weather", '{"city": "Paris"}', True), ("get_weather", '{"city": "Rome"}', True)]
    assert all(c.id.startswith("call_") for c in parser.calls) and parser.calls[0].id != parser.calls[1].id
    tricky, _ = parse([call_prefix("get_weather") + '{"city": "})}</tool_call> is a"}' + "}\n</tool_call>"])
    assert [(c.arguments, c.complete) for c in tricky.calls] == [('{"city": "})}</tool_call> is a"}', True)]
    cut, _ = parse(['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'])
    assert [(c.arguments, c.complete) for c in cut.calls] == [('{"city": "Par', False)]
    closing, _ = parse([call_prefix("get_weather") + '{"city": "Paris"}}\n</tool'])  # cut inside the end tag
    assert closing.calls[0].arguments == '{"city": "Paris"}'
    text, _ = parse(["no call: <tool_call> is just a word here, and nothing follows it" + " ." * 200])
    assert not text.calls and "<tool_call>" in "".join(text.content)


def test_held_back_text_is_released_once_it_cannot_be_a_call() -> None:
    parser = ToolCallParser()
    assert parser.push("a <tool") == [("content", "a ")]
    assert parser.push("box> b") == [("content", "<toolbox> b")]
    assert parser.push("<tool_call>\n") == []
    assert parser.push('{"name": "get_weather", "arguments": ') == []  # the arguments have not begun
    assert parser.push("{") == [("call", 0), ("arguments", 0, "{")]
    assert parser.push("}") == []  # may be the wrapper's }
    assert parser.push("}") == [("arguments", 0, "}")]
    assert parser.push("\n</tool_call>") == [] and parser.calls[0].complete

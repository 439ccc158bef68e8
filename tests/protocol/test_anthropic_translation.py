"""Anthropic Messages <-> chat completions, as pure functions: requests onto chat requests the gateway accepts,
chat answers and chunk streams back into shapes the `anthropic` SDK's own types validate, errors by status."""

from __future__ import annotations

import json

import msgspec
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from protocol.anthropic import (
    MessagesDialect,
    StreamTranslator,
    TextBlock,
    ToolUseBlock,
    decode_count_tokens,
    decode_messages,
    error_body,
    error_type,
    message_from_chat,
    to_chat,
)
from protocol.errors import BadRequest, RateLimited, UpstreamError
from protocol.openai import ChatCompletionRequest, decode_request

EVENT = TypeAdapter(RawMessageStreamEvent)
TOOL = {"name": "lookup", "description": "Look it up.", "input_schema": {"type": "object"}}


def _chat(body: dict) -> dict:
    """The chat request `body` translates to, checked to be one the gateway accepts."""
    request, raw = decode_messages(json.dumps({"model": "m", "max_tokens": 16, **body}).encode())
    chat = to_chat(request, raw)
    decode_request(chat, ChatCompletionRequest)
    return chat


def _bad(body: dict) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        _chat(body)
    return caught.value


# ---- requests -------------------------------------------------------------------------------------------


def test_text_system_and_sampling_fields():
    chat = _chat({"system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
                  "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["END", ""],
                  "temperature": 0.5, "top_p": 0.9, "top_k": 40, "metadata": {"user_id": "u1"}, "stream": True,
                  "thinking": {"type": "disabled"}, "route": {"prefer": "cost"}})
    assert chat == {
        "model": "m", "max_tokens": 16,
        "messages": [{"role": "system", "content": "Be brief.\nBe kind."}, {"role": "user", "content": "hi"}],
        "stop": ["END"], "temperature": 0.5, "top_p": 0.9, "top_k": 40, "user": "u1",
        "stream": True, "stream_options": {"include_usage": True},
        "route": {"prefer": "cost"},  # the gateway's routing fields are honoured; Anthropic's unknown ones dropped
    }
    plain = _chat({"system": "S", "messages": [{"role": "user", "content": "hi"}]})
    assert plain == {"model": "m", "max_tokens": 16,
                     "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]}


def test_blocks_images_and_prefill():
    chat = _chat({"messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?", "cache_control": {"type": "ephemeral"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "text", "text": "It is"}]},
    ]})
    assert chat["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": "It is"},  # thinking blocks are dropped
    ]
    # a final assistant message is continued, not answered
    assert chat["continue_final_message"] is True and chat["add_generation_prompt"] is False
    assert _chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "one"}]}]})["messages"] == [
        {"role": "user", "content": "one"}]


def test_tool_use_and_tool_results():
    chat = _chat({"tools": [TOOL], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "weather"}},
            {"type": "tool_use", "id": "toolu_2", "name": "lookup", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
             "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"type": "text", "text": "and tomorrow?"}]},
    ]})
    assert chat["tools"] == [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"},
                                                               "description": "Look it up."}}]
    assert chat["tool_choice"] == "auto" and chat["parallel_tool_calls"] is False
    assert chat["messages"][1:] == [
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q":"weather"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},  # results first: they answer the calls
        {"role": "tool", "tool_call_id": "toolu_2", "content": "a\nb"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    assert "continue_final_message" not in chat
    only_calls = _chat({"tools": [TOOL], "messages": [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "lookup", "input": {}}]}]})
    assert only_calls["messages"][-1]["content"] is None and "continue_final_message" not in only_calls


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "lookup"}, {"type": "function", "function": {"name": "lookup"}}),
])
def test_tool_choice(choice, expected):
    chat = _chat({"tools": [TOOL], "tool_choice": choice, "messages": [{"role": "user", "content": "x"}]})
    assert chat["tool_choice"] == expected and "parallel_tool_calls" not in chat


def test_output_format_becomes_a_json_schema_response_format():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = _chat({"output_config": {"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
                  "messages": [{"role": "user", "content": "x"}]})
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": schema, "strict": True}}


def test_max_tokens_is_required():
    with pytest.raises(BadRequest) as caught:
        decode_messages(b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}')
    assert caught.value.param == "max_tokens" and caught.value.message == "Missing required parameter: 'max_tokens'."


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": -1}, "top_k"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"name": "bad name!", "input_schema": {}}]},
     "tools[0].name"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL], "tool_choice": {"type": "tool"}},
     "tool_choice.name"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [TOOL],
      "tool_choice": {"type": "tool", "name": "other"}}, "tool_choice.name"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "tool", "name": "lookup"}},
     "tool_choice.name"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]}]},
     "messages[0].content[0].content[0]"),
])
def test_invalid_requests_name_the_field(body, param):
    error = _bad(body)
    assert error.param == param and f"'{param}'" in error.message and error.status == 400


def test_count_tokens_needs_no_max_tokens():
    request, raw = decode_count_tokens(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    assert to_chat(request, raw) == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


# ---- plain answers --------------------------------------------------------------------------------------


def _completion(message: dict, finish: str | None = "stop", **choice) -> bytes:
    return msgspec.json.encode({
        "id": "chatcmpl-abc", "object": "chat.completion", "created": 1, "model": "served",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    })


def test_a_text_answer():
    body = MessagesDialect("asked").plain(_completion({"content": "Hello."}))
    answer = json.loads(body)
    Message.model_validate(answer)
    assert answer == {"id": "msg_abc", "type": "message", "role": "assistant", "model": "served",
                      "content": [{"type": "text", "text": "Hello."}], "stop_reason": "end_turn",
                      "stop_sequence": None, "usage": {"input_tokens": 7, "output_tokens": 3}}


def test_a_tool_call_answer():
    calls = [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
             {"id": "toolu_2", "type": "function", "function": {"name": "lookup", "arguments": ""}},
             {"id": "", "type": "function", "function": {"name": "lookup", "arguments": "not json"}}]
    answer = message_from_chat(_completion({"content": "Looking.", "tool_calls": calls}, "tool_calls"))
    Message.model_validate(msgspec.to_builtins(answer))
    assert answer.stop_reason == "tool_use"
    assert [type(b) for b in answer.content] == [TextBlock, ToolUseBlock, ToolUseBlock, ToolUseBlock]
    assert answer.content[0].text == "Looking."
    ids = [b.id for b in answer.content[1:]]
    assert ids[0] == "toolu_call_1" and ids[1] == "toolu_2" and ids[2].startswith("toolu_") and len(ids[2]) > 6
    assert [b.input for b in answer.content[1:]] == [{"q": "x"}, {}, {}]  # unreadable arguments: an empty input


@pytest.mark.parametrize(("finish", "matched", "stops", "expected"), [
    ("stop", None, ["END"], ("end_turn", None)),  # a chat "stop" cannot say which sequence matched
    ("stop", "END", ["END"], ("stop_sequence", "END")),  # vLLM's stop_reason can
    ("stop", 2, ["END"], ("end_turn", None)),  # a stop token id is the end of the turn
    ("length", None, [], ("max_tokens", None)),
    ("content_filter", None, [], ("refusal", None)),
    (None, None, [], ("end_turn", None)),
])
def test_stop_reasons(finish, matched, stops, expected):
    answer = message_from_chat(_completion({"content": "x"}, finish, stop_reason=matched), frozenset(stops))
    assert (answer.stop_reason, answer.stop_sequence) == expected


def test_an_unreadable_or_empty_answer_is_still_a_message():
    answer = json.loads(MessagesDialect("asked").plain(b'{"choices": []}'))
    Message.model_validate(answer)
    assert answer["model"] == "asked" and answer["content"] == [{"type": "text", "text": ""}]


# ---- streams --------------------------------------------------------------------------------------------


def _chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None, **choice) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]
    return msgspec.json.encode({"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 1,
                                "model": "served", "choices": choices, "usage": usage})


def _frames(raw: bytes) -> list[dict]:
    """Each frame is `event: X` then `data: JSON` with the same type, valid for the SDK's event types."""
    events = []
    for frame in raw.decode().split("\n\n"):
        if not frame:
            continue
        event, data = frame.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert event == f"event: {payload['type']}"
        if payload["type"] != "error":
            EVENT.validate_python(payload)
        events.append(payload)
    return events


async def _translate(payloads: list[bytes], stops: list[str] | None = None) -> list[dict]:
    async def source():
        for payload in payloads:
            yield payload

    return _frames(b"".join([frame async for frame in MessagesDialect("asked", stops).stream(source())]))


async def test_a_text_stream():
    events = await _translate([
        _chunk({"role": "assistant", "content": ""}), _chunk({"content": "Hel"}), _chunk({"content": "lo"}),
        _chunk({}, "stop", stop_reason="END"), _chunk(usage={"prompt_tokens": 9, "completion_tokens": 2}),
    ], ["END"])
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                           "content_block_delta", "content_block_stop", "message_delta",
                                           "message_stop"]
    start = events[0]["message"]
    assert start["id"] == "msg_s1" and start["model"] == "served" and start["content"] == []
    assert [e["delta"] for e in events[2:4]] == [{"type": "text_delta", "text": "Hel"},
                                                 {"type": "text_delta", "text": "lo"}]
    assert events[5] == {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
                         "usage": {"output_tokens": 2, "input_tokens": 9}}


async def test_text_then_tool_calls_stream_as_blocks():
    events = await _translate([
        _chunk({"role": "assistant", "content": "Checking."}),
        _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "lookup", "arguments": ""}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "x"}'}}]}),
        _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "lookup", "arguments": "{}"}}]}),
        _chunk({}, "tool_calls"),
    ])
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2]
    assert starts[1]["content_block"] == {"type": "tool_use", "id": "toolu_call_a", "name": "lookup", "input": {}}
    assert [e["index"] for e in events if e["type"] == "content_block_stop"] == [0, 1, 2]
    json_of = {i: "".join(e["delta"]["partial_json"] for e in events
                          if e["type"] == "content_block_delta" and e["index"] == i) for i in (1, 2)}
    assert json.loads(json_of[1]) == {"q": "x"} and json_of[2] == "{}"
    closing = events[-2]
    assert closing["delta"]["stop_reason"] == "tool_use" and closing["usage"] == {"output_tokens": 4}


async def test_an_empty_stream_still_opens_and_closes_a_message():
    events = await _translate([])
    assert [e["type"] for e in events] == ["message_start", "content_block_start", "content_block_stop",
                                           "message_delta", "message_stop"]
    assert events[0]["message"]["model"] == "asked" and events[3]["delta"]["stop_reason"] == "end_turn"


@pytest.mark.parametrize("usage", [{"prompt_tokens": "7", "completion_tokens": "x"}, [1, 2], "lots",
                                   {"prompt_tokens": -7, "completion_tokens": 10**400}])
def test_a_usage_that_is_no_count_loses_neither_the_answer_nor_the_stream(usage):
    """Usage of the wrong type failed the decode of the whole answer: a 200 with an empty text (and an ERROR
    in the log); negatives and figures past any answer were relayed as the message's usage."""
    body = json.loads(_completion({"content": "Paris."}))
    body["usage"] = usage
    answer = message_from_chat(json.dumps(body).encode())
    assert answer.content[0].text == "Paris." and (answer.usage.input_tokens, answer.usage.output_tokens) == (0, 0)
    translator = StreamTranslator()
    frames = translator.feed(_chunk({"content": "Par"})) + translator.feed(json.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "is"},
                                                                    "finish_reason": "stop"}], "usage": usage}))
    assert b'"text":"is"' in frames and (translator.input_tokens, translator.output_tokens) == (None, None)


def test_an_upstream_error_payload_ends_the_stream_with_an_error():
    translator = StreamTranslator()
    translator.feed(_chunk({"content": "a"}))
    assert translator.feed(b"not json") == b""
    with pytest.raises(UpstreamError, match="boom"):
        translator.feed(b'{"error": {"message": "boom", "type": "server_error"}}')
    frame = MessagesDialect().stream_error(UpstreamError("upstream went away"))
    assert frame.startswith(b"event: error\ndata: ") and frame.endswith(b"\n\n")
    assert _frames(frame) == [{"type": "error", "error": {"type": "api_error", "message": "upstream went away"}}]


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (410, "invalid_request_error"), (413, "request_too_large"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "timeout_error"), (529, "overloaded_error"),
])
def test_error_types_by_status(status, kind):
    assert error_type(status) == kind


def test_error_body():
    limited = RateLimited("slow down")
    assert json.loads(error_body(limited.status, limited.message, "rid")) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}, "request_id": "rid"}
